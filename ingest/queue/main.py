# TEMPORARY shim until the queue split lands.
from ingest.kestrel.server import main  # noqa: F401
