# TEMPORARY shim until the queue split lands.
from ingest.kestrel.server import QUEUE_SETTINGS


def describe():
    return [(name, default, "") for name, (default, _) in QUEUE_SETTINGS.items()]
