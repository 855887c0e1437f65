"""SpoolingSink: the primary sink first; when it cannot take a batch, the spool does.

What it must not do: spool what the primary already stored (only `remaining` goes to
disk), or report ready when neither side can take records (the spool full, or its last
write failed and a probe of its disk still fails).
"""
from ingest.sinks import SinkUnavailable
from ingest.sinks.spool_log import SpoolNotices


class SpoolingSink:
    """Primary sink first; when it cannot take a batch, the spool does."""

    def __init__(self, primary, spool, notices=None):
        self.primary = primary
        self.spool = spool
        self.notices = notices or SpoolNotices(spool)   # the log lines (spool_log.py)

    def put(self, pairs):
        try:
            self.primary.put(pairs)
        except SinkUnavailable as exc:
            # Only what Kestrel did not store goes to the spool (no duplicates of the rest).
            rest = pairs if exc.remaining is None else exc.remaining
            self.spool.append(rest)
            self.notices.spooled(len(rest), exc)
        else:
            self.notices.primary_ok()

    def ready(self):
        ok, why = self.primary.ready()
        if ok:
            return ok, why
        if self.spool.full or self.spool.size_bytes() >= self.spool.max_bytes:
            return False, "spool full and %s" % why
        failing = self.spool.check_writable()
        if failing is not None:
            return False, "%s and %s" % (failing, why)
        return True, "spooling (%s)" % why
