"""`python -m ingest` is the same as the `ingest` console script."""
import sys

from ingest.cli import main

if __name__ == "__main__":
    sys.exit(main())
