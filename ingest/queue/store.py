"""One queue of `ingest queue`: its items in memory and in the journal, open reads, limits.

What it is for: `Queue` is a FIFO of ADD records (the journal's record IS the in-memory
item) plus the reads opened on it.  The oldest items are in memory, at most
`max_memory_bytes` of them (backlog.cost per item); past that, new items are only in the
journal (`backlog`, read-behind) and are read back, in order, as memory drains: ahead of
need by the server's read-ahead (`owner.want_refill`), or here with one blocking read
when memory is empty.  Every change is appended to the queue's Journal in the order it
happens in memory, so replaying the journal rebuilds the queue; `restore` adopts such a
replay at startup.  `maintain` keeps the journal small (truncate a drained journal, ask
the owner for a compaction).

`owner` is the server: `touched` (the set of queues with unwritten records),
`want_refill(q)`, `want_compaction(q)` and `close_fd(fd)`.

What it must not do: I/O except through its Journal, eventlet (blocked readers are woken
through waiters.py; reads ahead and compactions run in the server), or know about
connections and replies.
"""
import collections
import logging

from ingest.queue import journal as jr
from ingest.queue.backlog import ITEM_OVERHEAD, Backlog, Damaged
from ingest.queue.replay import keep_aside
from ingest.queue.waiters import item_arrived, queue_gone

log = logging.getLogger("ingest.queue")

# A journal bigger than compact_journal_bytes AND bigger than this many times its live
# records is rewritten.
COMPACT_RATIO = 4
# A drained journal up to this size is truncated inline; a bigger one is compacted (to
# nothing) in the background, so freeing its blocks never holds the event loop.
INLINE_TRUNCATE_BYTES = 64 * 1024 * 1024
PER_ITEM = jr.DATA_OFFSET + ITEM_OVERHEAD     # memory cost of an item beyond its data


class Queue:
    """The items (memory part + backlog), open reads, journal and counters of a queue."""

    def __init__(self, name, journal, options, owner):
        self.name = name
        self.name_bytes = name.encode("utf-8", "surrogateescape")
        self.options = options        # QueueOptions; replaced whole on reload
        self.items = collections.deque()     # the memory part, head first
        self.mem_bytes = 0            # data bytes in memory
        self.bytes = 0                # data bytes queued (memory + backlog)
        self.backlog = None           # backlog.Backlog: the items only in the journal
        self.open = {}                # xid -> record, in opening order
        self.open_bytes = 0
        self.next_xid = 1
        self.waiters = collections.deque()   # blocked consumers, woken one per item
        self.peekers = collections.deque()   # blocked peeks, all woken by an item
        self.children = []            # fanout: queues named <name>+<child>
        self.journal = journal        # journal.Journal of this queue's file
        self.owner = owner
        self.deleted = False
        self.total_items = self.expired = self.discarded = 0
        self.lost = self.rewrites = 0
        self.last_removed_add_ms = 0
        self.compacting = False       # a rewrite of the journal is under way
        self.compact_after = 0.0      # monotonic time before which no rewrite is tried
        self.compact_failures = 0

    # -- journal helpers
    def _log(self, record):
        self.journal.append(record)
        self.owner.touched.add(self)

    def restore(self, loaded):
        """Adopt a replayed journal (replay.Loaded); reads open at the last stop go back
        to the head."""
        self.items = collections.deque(loaded.head)
        self.mem_bytes = sum(jr.item_size(r) for r in self.items)
        if loaded.backlog is not None:
            pos, count, nbytes = loaded.backlog
            self.backlog = Backlog(pos, count, nbytes, self._chunk())
        self.bytes = self.mem_bytes + (self.backlog.bytes if self.backlog else 0)
        self.next_xid = loaded.max_xid + 1
        self.lost = loaded.lost
        rolled = list(loaded.open.items())
        for xid, record in reversed(rolled):
            self._push_head(record)
            self._log(jr.encode_xid(jr.OP_UNREMOVE, xid))
        if rolled:
            log.info("queue %s: rolled back %d reads open at the last stop",
                     self.name, len(rolled))

    def count(self):
        """Items queued (memory + backlog), open reads not included."""
        return len(self.items) + (self.backlog.items if self.backlog is not None else 0)

    # -- writes
    def add(self, record, size, now_ms):
        """Append one item; False (NOT_STORED) when too big or full and not discarding."""
        cfg = self.options
        if cfg.max_item_bytes is not None and size > cfg.max_item_bytes:
            return False
        if self._full() and (self.expire_head(now_ms) == 0 or self._full()):
            if not cfg.discard_old_when_full:
                return False
            while self._full() and self.count():
                self._drop_head()
                self.discarded += 1
        if cfg.max_age_ms is not None:
            record = self._cap_age(record, now_ms)
        if self.backlog is None and (not self.items or self.mem_bytes + size + PER_ITEM * (
                len(self.items) + 1) <= cfg.max_memory_bytes):
            self.items.append(record)
            self.mem_bytes += size
        else:
            if self.backlog is None:
                self.backlog = Backlog(self.journal.end, chunk=self._chunk())
            self.backlog.add(size)
        self.bytes += size
        self.total_items += 1
        self._log(record)
        if self.waiters or self.peekers:
            self.wake()
        return True

    def add_many(self, records, sizes, now_ms):
        """add() of each record in turn (their `sizes`): the list of their outcomes.

        PERF: when every one of them would take add()'s plainest path (no item, count,
        byte or age limit in the way, nobody waiting, and either room in memory for all
        or a backlog already begun), they are added in bulk
        (connection.Connection._plain_sets has the figures)."""
        cfg = self.options
        if (cfg.max_items is None and cfg.max_bytes is None and cfg.max_age_ms is None
                and not self.waiters and not self.peekers
                and (cfg.max_item_bytes is None or max(sizes) <= cfg.max_item_bytes)):
            total = sum(sizes)
            backlog = self.backlog
            if backlog is None:
                if (self.mem_bytes + total + PER_ITEM * (len(self.items) + len(records))
                        > cfg.max_memory_bytes):
                    # Some fit in memory and the rest start the backlog: add() decides.
                    return [self.add(record, size, now_ms)
                            for record, size in zip(records, sizes)]
                self.items.extend(records)
                self.mem_bytes += total
            else:
                # PERF: a queue behind its consumers (read-behind) takes a batch as one:
                # add() item by item cost 21,645 instructions per set of a 50-set batch
                # against 16,854 in memory (in process, under callgrind); this way
                # 13,580 against 13,688.  wrk_bench's batch50 fills memory within seconds.
                backlog.add(total, len(records))
            self.bytes += total
            self.total_items += len(records)
            self.journal.extend(records)
            self.owner.touched.add(self)
            return [True] * len(records)
        return [self.add(record, size, now_ms) for record, size in zip(records, sizes)]

    def _full(self):
        cfg = self.options
        return ((cfg.max_items is not None and self.count() >= cfg.max_items) or
                (cfg.max_bytes is not None and self.bytes >= cfg.max_bytes))

    def _cap_age(self, record, now_ms):
        limit = now_ms + self.options.max_age_ms
        expiry = jr.item_expiry_ms(record)
        if expiry and expiry <= limit:
            return record
        return jr.encode_add(jr.item_data(record), jr.item_add_ms(record), limit)

    def _push_head(self, record):
        self.items.appendleft(record)
        size = jr.item_size(record)
        self.mem_bytes += size
        self.bytes += size

    def _pop(self):
        """Take the head item out of the queue (the caller journals why); None when the
        only items left turned out damaged when read back."""
        if not self.items:
            self._read_back()
            if not self.items:
                return None
        record = self.items.popleft()
        size = jr.item_size(record)
        self.mem_bytes -= size
        self.bytes -= size
        self.last_removed_add_ms = jr.item_add_ms(record)
        if self.backlog is not None and self.mem_cost() < self.options.max_memory_bytes * 3 // 4:
            self.owner.want_refill(self)
        return record

    def _drop_head(self):
        record = self._pop()
        if record is not None:
            self._log(jr.REMOVE_RECORD)
        return record

    def head(self):
        """The head item's record, or None (reads it back from the journal if needed)."""
        if not self.items and self.backlog is not None:
            self._read_back()
        return self.items[0] if self.items else None

    def expire_head(self, now_ms):
        """Drop expired items at the head (only the head is examined, like Kestrel)."""
        n = 0
        while True:
            record = self.head()
            if record is None:
                break
            expiry = jr.item_expiry_ms(record)
            if not expiry or expiry > now_ms:
                break
            self._drop_head()
            n += 1
        self.expired += n
        return n

    # -- reads
    def take(self, now_ms):
        self.expire_head(now_ms)
        return self._drop_head() if self.count() else None

    def peek(self, now_ms):
        self.expire_head(now_ms)
        return self.head()

    def open_head(self, now_ms):
        """Tentatively remove the head; returns (xid, record) or None."""
        self.expire_head(now_ms)
        record = self._pop() if self.count() else None
        if record is None:
            return None
        xid, self.next_xid = self.next_xid, self.next_xid + 1
        self.open[xid] = record
        self.open_bytes += jr.item_size(record)
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
        self.open_bytes -= jr.item_size(record)
        self._push_head(record)
        self._log(jr.encode_xid(jr.OP_UNREMOVE, xid))
        if self.waiters or self.peekers:
            self.wake()

    def flush(self):
        if self.items:
            self.last_removed_add_ms = jr.item_add_ms(self.items[-1])
        self.items.clear()
        self.mem_bytes = self.bytes = 0
        self.backlog = None
        self._log(jr.FLUSH_RECORD)

    # -- the memory part and the backlog
    def mem_cost(self):
        return self.mem_bytes + PER_ITEM * len(self.items)

    def _chunk(self):
        return min(max(self.options.max_memory_bytes // 4, 64 * 1024), 1024 * 1024)

    def fill(self, limit=None):
        """Move buffered backlog items into memory, up to the bound and to `limit` bytes
        (at least one when memory is empty)."""
        backlog = self.backlog
        budget = self.options.max_memory_bytes - self.mem_cost()
        if limit is not None:
            budget = min(budget, limit)
        try:
            records, _ = backlog.take(budget if self.items else max(budget, 1))
        except Damaged as damaged:
            self._damaged(damaged)
            return
        self.items.extend(records)
        self.mem_bytes += sum(len(r) for r in records) - jr.DATA_OFFSET * len(records)
        if not backlog.items:
            self.backlog = None

    def _read_back(self):
        """Memory is empty and the backlog is not: read the next items now (blocking;
        the read-ahead normally keeps this from happening)."""
        self.journal.write()      # the next backlog record may still be buffered
        while self.backlog is not None and not self.items:
            backlog = self.backlog
            before = backlog.pos
            self.fill()
            if self.items or self.backlog is not backlog or backlog.pos != before:
                continue          # (stepped over head operations or a damaged record)
            want = backlog.want(self.journal.size)
            if want is None or not backlog.feed(want[0], self.journal.read(*want)):
                jr.fatal_io_error("reading back queue %s at offset %d" % (
                    self.name, backlog.pos), OSError("the journal ends early"))

    def _damaged(self, damaged):
        """An item record read back fails its crc: skip it when the records around it are
        sound (the loss is logged and counted), else stop so the restart recovers."""
        if not (damaged.item and self._sound_at(damaged.end)):
            jr.fatal_io_error("reading back queue %s" % self.name, OSError(
                "journal damaged at offset %d" % damaged.at))
        aside = keep_aside(self.journal.path)
        size = damaged.end - damaged.at - jr.DATA_OFFSET
        self.backlog.skip(damaged)
        self.bytes -= size
        self.lost += 1
        if not self.backlog.items:
            self.backlog = None
        log.error("queue %s: item record at offset %d of the journal is damaged; 1 item"
                  " (%d bytes) lost; the damaged file is kept as %s", self.name,
                  damaged.at, size, aside)
        self.owner.want_compaction(self, force=True)

    def _sound_at(self, pos):
        """True when a valid record starts at `pos` (or the written journal ends there)."""
        size = self.journal.size
        if pos == size:
            return True
        head = self.journal.read(pos, jr.HEADER_BYTES)
        if len(head) < jr.HEADER_BYTES:
            return False
        n = jr.HEADER_BYTES + jr.HEADER.unpack_from(head)[0]
        return n <= size - pos and jr.frame_end(self.journal.read(pos, n), 0, n) is not None

    # -- waiters
    def wake(self):
        """An item is at the head: wake every blocked peek and one blocked consumer."""
        item_arrived(self.waiters, self.peekers, self.head())

    def wake_all(self):
        queue_gone(self.waiters, self.peekers)

    def waiting(self, peek):
        """The list a blocked get of this kind waits in."""
        return self.peekers if peek else self.waiters

    # -- journal maintenance
    def live_bytes(self):
        return (self.bytes + self.open_bytes +
                jr.DATA_OFFSET * (self.count() + len(self.open)))

    def maintain(self):
        """After a write: truncate a small drained journal; ask for a compaction of a big
        drained one or of one that is mostly dead records."""
        if self.compacting:
            return
        size, cfg = self.journal.size, self.options
        if not self.count() and not self.open:
            if size and size >= cfg.drained_journal_bytes:
                if size <= INLINE_TRUNCATE_BYTES:
                    self.journal.truncate(self.owner.close_fd)
                else:
                    self.owner.want_compaction(self)
        elif size > cfg.compact_journal_bytes and size > COMPACT_RATIO * self.live_bytes():
            self.owner.want_compaction(self)

    def stats(self, now_ms):
        age = now_ms - self.last_removed_add_ms if self.bytes and self.last_removed_add_ms else 0
        return [("items", self.count()), ("bytes", self.bytes),
                ("total_items", self.total_items), ("logsize", self.journal.size),
                ("expired_items", self.expired), ("mem_items", len(self.items)),
                ("mem_bytes", self.mem_bytes), ("age", age), ("discarded", self.discarded),
                ("waiters", len(self.waiters) + len(self.peekers)),
                ("open_transactions", len(self.open)),
                ("journal_rewrites", self.rewrites), ("lost_items", self.lost)]
