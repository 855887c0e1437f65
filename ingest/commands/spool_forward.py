"""`ingest spool forward DIR --kestrel ...`: empty a spool directory into Kestrel.

What it is for: a worker's spool left behind (a dead host's disk, a worker that will
not come back) is forwarded by hand, oldest first, with the worker's own Forwarder:
damage is kept aside and records every server refuses become dead letters, as in the
worker.  `--dead-letters` first puts the records of the dead-letter files back into the
spool (appended and fsynced, then the file removed), to send them again once the
servers' limits allow.

What it must not do: run beside a live worker on the same directory (the spool's lock
refuses that) or delete anything Kestrel did not store.
"""
import logging
import os
import time

from ingest.kestrel.client import Client
from ingest.sinks import frames
from ingest.sinks.forwarder import Forwarder
from ingest.sinks.kestrel import KestrelSink
from ingest.sinks.spool import Spool

log = logging.getLogger("ingest.spool")
GIVE_UP_S = 60


def forward(directory, servers, dead_letter_s=600.0, requeue_dead=False):
    """Forward everything; exit code 0 when the spool is empty, 1 when Kestrel refused
    for GIVE_UP_S seconds."""
    if not os.path.isdir(directory):
        raise SystemExit("no spool directory at %s" % directory)
    spool = Spool(directory)
    forwarder = Forwarder(spool, KestrelSink(Client(servers)).put, dead_letter_s=dead_letter_s)
    deadline = time.monotonic() + GIVE_UP_S
    try:
        if requeue_dead:
            requeue_dead_letters(spool)
        while not forwarder.forward_once():
            if time.monotonic() > deadline:
                log.error("no Kestrel server took records for %d s; %d forwarded so far",
                          GIVE_UP_S, forwarder.forwarded)
                return 1
            time.sleep(forwarder.retry_s)
    finally:
        spool.close()
    print("forwarded %d records from %s" % (forwarder.forwarded, directory))
    if spool.dead_letters or spool.damaged_records:
        print("%d dead letters, %d damaged records kept aside in %s"
              % (spool.dead_letters, spool.damaged_records, directory))
    return 0


def requeue_dead_letters(spool):
    """Append the records of every `*.dead` file to the spool, then remove the file."""
    for name in sorted(os.listdir(spool.dir)):
        if not name.endswith(".dead"):
            continue
        path = os.path.join(spool.dir, name)
        with open(path, "rb") as fh:
            data = fh.read()
        segment = frames.open_segment(data)
        pairs = [(event[2], event[3]) for event in frames.scan(data, segment.body, segment.version)
                 if event[0] is frames.FRAME]
        if pairs:
            spool.append(pairs)
        os.unlink(path)
        log.info("%s: %d dead letters put back into the spool", name, len(pairs))
