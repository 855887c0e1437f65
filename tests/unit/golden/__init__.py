"""Golden replay data for tests/unit/test_golden.py, and the shared WSGI test harness."""
