"""`ingest routes check FILE`: validate a routes file before installing it.

What it is for: the operator's check before `mv`-ing a new routes file into place and
signalling the workers.  It runs exactly the validation a worker runs at start and on
SIGHUP (ingest/routing/routes_file.py), so it prints the same message a worker would log.
What it must not do: touch the worker, the spool or the installed file (it only reads
FILE).
"""
import sys

from ingest.routing import RoutesError, RoutingTable


def check(path, out=None, err=None):
    """0 and a one-line summary when the file is good; 1 and the worker's message when not."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        table = RoutingTable.from_file(path)
    except RoutesError as exc:
        err.write("ingest routes check: bad routes file: %s\n" % exc)
        return 1
    out.write("%s: ok (%d tokens)\n" % (path, len(table)))
    return 0
