"""What a worker says about its spool: when it starts and stops spooling, how much is
spooled, and when forwarding completes, rate-limited.

What it is for: an operator reading the worker's log must see at once that Kestrel stopped
taking records (the first spooled batch logs a warning), how much piles up (one progress
line per `every_s` at most, however many requests spool), when Kestrel takes records
again, and when the forwarder has emptied the spool.  SpoolingSink (fallback.py) and the
Forwarder (forwarder.py) call it; /ready and /metrics report the same state.

What it must not do: log per request, touch the spool's files, or cost the hot path more
than an attribute test when nothing is being spooled.
"""
import logging
import time

log = logging.getLogger("ingest.spool")

EVERY_S = 10.0


class SpoolNotices:
    def __init__(self, spool, every_s=EVERY_S, clock=time.monotonic, logger=log):
        self.spool = spool
        self.every_s = every_s
        self.clock = clock
        self.log = logger
        self.spooling = False
        self.since = None           # when the current spooling episode started
        self.records = 0            # records spooled in it
        self.last_line = None       # when a spooling progress line was last written
        self.forwarded_told = 0     # forwarded count at the last forwarding line
        self.last_forward_line = None

    def _size(self):
        return "%d bytes in %s" % (self.spool.size_bytes(), self.spool.dir)

    def spooled(self, records, why):
        """`records` records went to the spool because the primary sink failed (`why`)."""
        now = self.clock()
        self.records += records
        if not self.spooling:
            self.spooling, self.since, self.last_line = True, now, now
            self.log.warning("spooling: %s; records are written to the spool and forwarded"
                             " when Kestrel takes them again (%s)", why, self._size())
        elif now - self.last_line >= self.every_s:
            self.last_line = now
            self.log.warning("still spooling after %.0fs: %d records spooled since it began"
                             " (%s)", now - self.since, self.records, self._size())

    def primary_ok(self):
        """The primary sink took a batch; the end of a spooling episode, if one ran."""
        if not self.spooling:       # PERF: the only cost on the hot path
            return
        self.spooling = False
        self.log.warning("stopped spooling after %.1fs: Kestrel takes records again; %d"
                         " records were spooled meanwhile, forwarding them (%s)",
                         self.clock() - self.since, self.records, self._size())
        self.records = 0

    def forwarding(self, forwarded):
        """Progress of the forwarder (`forwarded`: its running total), rate-limited."""
        now = self.clock()
        if forwarded == self.forwarded_told:
            return
        if self.last_forward_line is None:
            self.last_forward_line = now
        elif now - self.last_forward_line >= self.every_s:
            self.last_forward_line = now
            self.log.info("forwarding: %d records forwarded so far (%s left)",
                          forwarded - self.forwarded_told, self._size())

    def forwarded_all(self, forwarded):
        """The spool is empty; says so once per batch of forwarded records."""
        if forwarded == self.forwarded_told:
            return
        self.log.warning("forwarding complete: %d records forwarded to Kestrel, the spool"
                         " is empty", forwarded - self.forwarded_told)
        self.forwarded_told = forwarded
        self.last_forward_line = None
