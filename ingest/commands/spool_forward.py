"""`ingest spool forward DIR --kestrel ...`: empty a spool directory into Kestrel.

What it is for: a worker's spool left behind (a dead host's disk, a worker that will
not come back) is forwarded by hand, oldest first, with the worker's own Forwarder.
What it must not do: run beside a live worker on the same directory (the spool's lock
refuses that) or delete anything Kestrel did not store.
"""
import logging
import os
import time

from ingest.kestrel.client import Client
from ingest.sinks.forwarder import Forwarder
from ingest.sinks.kestrel import KestrelSink
from ingest.sinks.spool import Spool

log = logging.getLogger("ingest.spool")
GIVE_UP_S = 60


def forward(directory, servers):
    """Forward everything; exit code 0 when the spool is empty, 1 when Kestrel refused
    for GIVE_UP_S seconds."""
    if not os.path.isdir(directory):
        raise SystemExit("no spool directory at %s" % directory)
    spool = Spool(directory)
    forwarder = Forwarder(spool, KestrelSink(Client(servers)).put)
    deadline = time.monotonic() + GIVE_UP_S
    try:
        while not forwarder.forward_once():
            if time.monotonic() > deadline:
                log.error("no Kestrel server took records for %d s; %d forwarded so far",
                          GIVE_UP_S, forwarder.forwarded)
                return 1
            time.sleep(forwarder.retry_s)
    finally:
        spool.close()
    print("forwarded %d records from %s" % (forwarder.forwarded, directory))
    return 0
