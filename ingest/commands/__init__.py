"""Operator commands that are plain blocking programs (no eventlet):

    consume.py        ingest consume QUEUE: reliable-read items, one JSON line each
    stats.py          ingest stats: depths, totals and rates per Kestrel server
    spool_forward.py  ingest spool forward DIR: empty a spool into Kestrel
    queue_export.py   ingest queue export: move a queue data directory's items into a cluster
    routes_check.py   ingest routes check FILE: validate a routes file before installing it
"""
