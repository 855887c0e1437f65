"""Mixpanel-compatible event ingestion server with a bundled Kestrel-compatible queue."""

__version__ = "0.1.0"
