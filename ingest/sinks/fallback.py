"""SpoolingSink: the primary sink first; when it cannot take a batch, the spool does.

What it must not do: spool what the primary already stored (only `remaining` goes to
disk), or report ready when neither side can take records (the spool full, or its last
write failed and a probe of its disk still fails).
"""
from ingest.sinks import SinkUnavailable


class SpoolingSink:
    """Primary sink first; when it cannot take a batch, the spool does."""

    def __init__(self, primary, spool):
        self.primary = primary
        self.spool = spool

    def put(self, pairs):
        try:
            self.primary.put(pairs)
        except SinkUnavailable as exc:
            # Only what Kestrel did not store goes to the spool (no duplicates of the rest).
            self.spool.append(pairs if exc.remaining is None else exc.remaining)

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
