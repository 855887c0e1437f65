"""One queue of `ingest queue` in memory: its items, open reads, limits and counters.

What it is for: `Queue` is a FIFO of ADD records (the journal's record IS the in-memory
item) plus the reads opened on it.  Every change is appended to the queue's Journal in
the order it happens in memory, so replaying the journal rebuilds the queue; `restore`
adopts such a replay at startup.  It also keeps the journal small (`maintain`).

What it must not do: I/O except through its Journal (which only buffers until the
server writes a batch), eventlet (blocked readers are woken through waiters.py), or
know about connections and replies.
"""
import collections
import logging

from ingest.queue import journal as jr
from ingest.queue.waiters import item_arrived, queue_gone

log = logging.getLogger("ingest.queue")

# A journal bigger than compact_journal_bytes AND bigger than this many times its live
# records is rewritten.
COMPACT_RATIO = 4


class Queue:
    """A FIFO of ADD records plus its open reads, journal and counters.  No I/O except
    through its Journal; no eventlet (waking blocked reads goes through waiters.py)."""

    def __init__(self, name, journal, options, touched):
        self.name = name
        self.name_bytes = name.encode("utf-8", "surrogateescape")
        self.options = options        # QueueOptions; replaced whole on reload
        self.items = collections.deque()
        self.bytes = 0
        self.open = {}                # xid -> record, in opening order
        self.open_bytes = 0
        self.next_xid = 1
        self.waiters = collections.deque()   # blocked consumers, woken one per item
        self.peekers = collections.deque()   # blocked peeks, all woken by an item
        self.children = []            # fanout: queues named <name>+<child>
        self.journal = journal        # journal.Journal of this queue's file
        self.touched = touched        # server-wide set of queues with unwritten records
        self.deleted = False
        self.total_items = self.expired = self.discarded = 0
        self.last_removed_add_ms = 0

    # -- journal helpers
    def _log(self, record):
        self.journal.append(record)
        self.touched.add(self)

    def restore(self, state):
        """Adopt a replayed journal; reads open at the crash go back to the head."""
        self.items = state.items
        self.bytes = sum(jr.item_size(r) for r in self.items)
        self.next_xid = state.max_xid + 1
        rolled = list(state.open.items())
        for xid, record in reversed(rolled):
            self.items.appendleft(record)
            self.bytes += jr.item_size(record)
            self._log(jr.encode_xid(jr.OP_UNREMOVE, xid))
        if rolled:
            log.info("queue %s: rolled back %d reads open at the last stop",
                     self.name, len(rolled))

    # -- writes
    def add(self, record, size, now_ms):
        """Append one item; False (NOT_STORED) when too big or full and not discarding."""
        cfg = self.options
        if cfg.max_item_bytes is not None and size > cfg.max_item_bytes:
            return False
        if self._full() and (self.expire_head(now_ms) == 0 or self._full()):
            if not cfg.discard_old_when_full:
                return False
            while self.items and self._full():
                self._drop_head()
                self.discarded += 1
        if cfg.max_age_ms is not None:
            record = self._cap_age(record, now_ms)
        self.items.append(record)
        self.bytes += size
        self.total_items += 1
        self._log(record)
        if self.waiters or self.peekers:
            self.wake()
        return True

    def _full(self):
        cfg = self.options
        return ((cfg.max_items is not None and len(self.items) >= cfg.max_items) or
                (cfg.max_bytes is not None and self.bytes >= cfg.max_bytes))

    def _cap_age(self, record, now_ms):
        limit = now_ms + self.options.max_age_ms
        expiry = jr.item_expiry_ms(record)
        if expiry and expiry <= limit:
            return record
        return jr.encode_add(jr.item_data(record), jr.item_add_ms(record), limit)

    def _drop_head(self):
        record = self.items.popleft()
        self.bytes -= jr.item_size(record)
        self.last_removed_add_ms = jr.item_add_ms(record)
        self._log(jr.REMOVE_RECORD)
        return record

    def expire_head(self, now_ms):
        """Drop expired items at the head (only the head is examined, like Kestrel)."""
        n = 0
        items = self.items
        while items:
            expiry = jr.item_expiry_ms(items[0])
            if not expiry or expiry > now_ms:
                break
            self._drop_head()
            n += 1
        self.expired += n
        return n

    # -- reads
    def take(self, now_ms):
        self.expire_head(now_ms)
        return self._drop_head() if self.items else None

    def peek(self, now_ms):
        self.expire_head(now_ms)
        return self.items[0] if self.items else None

    def open_head(self, now_ms):
        """Tentatively remove the head; returns (xid, record) or None."""
        self.expire_head(now_ms)
        if not self.items:
            return None
        record = self.items.popleft()
        size = jr.item_size(record)
        self.bytes -= size
        self.last_removed_add_ms = jr.item_add_ms(record)
        xid, self.next_xid = self.next_xid, self.next_xid + 1
        self.open[xid] = record
        self.open_bytes += size
        self._log(jr.encode_xid(jr.OP_OPEN, xid))
        return xid, record

    def confirm(self, xid):
        record = self.open.pop(xid, None)
        if record is not None and not self.deleted:
            self.open_bytes -= jr.item_size(record)
            self._log(jr.encode_xid(jr.OP_CONFIRM, xid))

    def unremove(self, xid):
        """An open read goes back to the head (abort, disconnect)."""
        record = self.open.pop(xid, None)
        if record is None or self.deleted:
            return
        size = jr.item_size(record)
        self.open_bytes -= size
        self.items.appendleft(record)
        self.bytes += size
        self._log(jr.encode_xid(jr.OP_UNREMOVE, xid))
        if self.waiters or self.peekers:
            self.wake()

    def flush(self):
        if self.items:
            self.last_removed_add_ms = jr.item_add_ms(self.items[-1])
        self.items.clear()
        self.bytes = 0
        self._log(jr.FLUSH_RECORD)

    # -- waiters
    def wake(self):
        """An item is at the head: wake every blocked peek and one blocked consumer."""
        item_arrived(self.waiters, self.peekers, self.items[0] if self.items else None)

    def wake_all(self):
        queue_gone(self.waiters, self.peekers)

    def waiting(self, peek):
        """The list a blocked get of this kind waits in."""
        return self.peekers if peek else self.waiters

    # -- journal maintenance
    def live_bytes(self):
        return (self.bytes + self.open_bytes +
                jr.DATA_OFFSET * (len(self.items) + len(self.open)))

    def maintain(self, close_fd):
        """After a write: truncate a drained journal, compact a mostly-dead one."""
        size, cfg = self.journal.size, self.options
        if not self.items and not self.open:
            if size and size >= cfg.drained_journal_bytes:
                self.journal.truncate()
        elif size > cfg.compact_journal_bytes and size > COMPACT_RATIO * self.live_bytes():
            self.rewrite(close_fd)

    def rewrite(self, close_fd):
        """Journal := ADD+OPEN for each open read, then ADD for each queued item."""
        records = list(self.open.values())
        records.extend(jr.encode_xid(jr.OP_OPEN, xid) for xid in self.open)
        records.extend(self.items)
        before = self.journal.size
        self.journal.rewrite(records, close_fd)
        log.info("queue %s: journal rewritten, %d -> %d bytes",
                 self.name, before, self.journal.size)

    def stats(self, now_ms):
        age = now_ms - self.last_removed_add_ms if self.bytes and self.last_removed_add_ms else 0
        return [("items", len(self.items)), ("bytes", self.bytes),
                ("total_items", self.total_items), ("logsize", self.journal.size),
                ("expired_items", self.expired), ("mem_items", len(self.items)),
                ("mem_bytes", self.bytes), ("age", age), ("discarded", self.discarded),
                ("waiters", len(self.waiters) + len(self.peekers)),
                ("open_transactions", len(self.open))]
