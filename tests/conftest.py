import os
import sys

# The repository root, so that `ingest`, `testkit` and `bench` import from this checkout.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
