"""The last good routes file of a worker slot, kept on disk beside its spool.

What it is for: a routes file that a reload refused stays on disk, so the next restart of
the worker would read it again.  Each time a file is loaded successfully, the exact bytes
that were validated are saved as `routes.last-good.json` in the slot's spool directory
(the spool's lock makes that directory the slot's own).  A worker that starts with a
refused file routes with that copy instead and says so; without a copy it refuses to
start.  `load()` is the Router's loader: snapshot the file, validate the snapshot under
the file's own name (so messages are the same as without a copy), then rename the
snapshot over the copy.

What it must not do: keep a copy it did not validate, fail a good load because the copy
could not be written (a full spool disk only costs the copy, loudly), or use eventlet.
"""
import logging
import os
import tempfile
import time

from ingest.fileio import fsync_dir
from ingest.routing.routes_file import RoutesError
from ingest.routing.table import RoutingTable

FILENAME = "routes.last-good.json"

log = logging.getLogger("ingest.routing")


class LastGoodRoutes:
    def __init__(self, directory):
        self.dir = directory
        self.path = os.path.join(directory, FILENAME)

    def exists(self):
        return os.path.exists(self.path)

    def load(self, path):
        """The table of the routes file at `path`; when it is good, its bytes become the
        last good copy.  RoutesError (naming `path`) when it is not."""
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
        except OSError:
            return RoutingTable.from_file(path)      # raises the usual "cannot read"
        try:
            snapshot = self._write_snapshot(raw)
        except OSError as exc:
            log.error("routes: could not keep a copy of %s in %s (%s); a restart with a bad"
                      " routes file would find no last good table", path, self.dir, exc)
            return RoutingTable.from_file(path)
        try:
            table = RoutingTable.from_file(snapshot, source=str(path))
            os.replace(snapshot, self.path)
            fsync_dir(self.dir)
            return table
        finally:
            if os.path.exists(snapshot):
                os.unlink(snapshot)

    def _write_snapshot(self, raw):
        fd, snapshot = tempfile.mkstemp(prefix=".routes-", suffix=".json", dir=self.dir)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(raw)
                out.flush()
                os.fsync(out.fileno())
        except OSError:
            os.unlink(snapshot)
            raise
        return snapshot

    def fallback(self, refused):
        """The table of the last good copy, for a worker whose routes file was refused
        (`refused`: that RoutesError), and the reason to report while it is in use.
        RoutesError when there is no usable copy."""
        if not self.exists():
            raise RoutesError("%s; no last good routes table in %s to fall back on"
                              % (refused, self.dir))
        try:
            table = RoutingTable.from_file(self.path)
        except RoutesError as exc:
            raise RoutesError("%s; and the last good copy is unusable: %s" % (refused, exc)) \
                from None
        saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(self.path)))
        reason = ("routes file refused (%s); routing with the last good table, saved %s in %s"
                  % (refused, saved, self.path))
        return table, reason
