"""Read-behind: the part of a queue that is only in its journal, read back in order.

What it is for: a queue keeps at most its `max_memory_bytes` of items in memory (each
item counted as its record plus ITEM_OVERHEAD, what it really takes in RAM).  Past that,
new items are only appended to the journal, and a `Backlog` stands for them: `pos` is
where the file scan for the next one resumes, `items` and `bytes` count them.  Every ADD
record from `pos` to the end of the file is a backlog item (the head operations in
between were already applied to memory, so they are skipped), which keeps the order:
memory holds the oldest items, the backlog the newer ones, and new items join the
backlog until it has been read back completely.

How reads happen: `want()` names the file bytes to read next, the caller reads them
(os.pread on the loop when a read cannot wait, in a native thread to read ahead; store.py
and server.py decide) and hands them to `feed()`; `take()` parses the fed bytes into
records, checking each item's crc, and raises Damaged for one that fails.

What it must not do: open or read files itself, or know about queues, eventlet or the
memory bound beyond the cost of one record.
"""
import zlib

from ingest.queue.journal import ADD_BODY_MIN, HEADER, HEADER_BYTES, OP_ADD, body_fits

# Counted per item held in memory on top of its record: the bytes object's header (33),
# the deque slot (8) and malloc's rounding.
ITEM_OVERHEAD = 64
# PERF: `take` looks at most this many records per call, so a stretch of small head
# operations (57,000 removals in a 512 KiB piece) cannot hold the loop for tens of ms.
TAKE_RECORDS = 4096


def cost(record):
    """What one item in memory counts against max_memory_bytes."""
    return len(record) + ITEM_OVERHEAD


class Damaged(Exception):
    """A record read back fails its check: `at` where it starts, `end` where its header
    says it ends, `item` True when it has the size of an item record."""

    def __init__(self, at, end, item):
        super().__init__("damaged record at offset %d" % at)
        self.at, self.end, self.item = at, end, item


class Backlog:
    """Items only in the journal, from file offset `pos` on: their count, size and a
    read buffer (the file's bytes [base, base + len(buf)))."""

    __slots__ = ("pos", "items", "bytes", "buf", "base", "consumed", "chunk")

    def __init__(self, pos, items=0, nbytes=0, chunk=1 << 20):
        self.pos = pos
        self.items = items
        self.bytes = nbytes
        self.buf = b""
        self.base = pos
        self.consumed = 0         # bytes of ADD records handed out (a rewrite maps pos)
        self.chunk = chunk

    def add(self, size, count=1):
        """`count` items of `size` bytes in all, appended to the journal."""
        self.items += count
        self.bytes += size

    def want(self, written):
        """(offset, length) of the next read, or None when the buffer already holds the
        next record or nothing more is written (`written`: the journal's size)."""
        start = self.base + len(self.buf)
        need = self.chunk
        off = self.pos - self.base
        if len(self.buf) - off >= HEADER_BYTES:
            end = self.pos + HEADER_BYTES + HEADER.unpack_from(self.buf, off)[0]
            if end <= start:
                return None
            need = max(need, end - start)
        length = min(need, written - start)
        return (start, length) if length > 0 else None

    def feed(self, at, data):
        """Bytes read at file offset `at`; dropped (False) unless they continue the buffer
        (a read that raced with another is simply stale)."""
        if at != self.base + len(self.buf) or not data:
            return False
        off = self.pos - self.base           # bytes of the buffer already taken
        self.buf = data if off == len(self.buf) else self.buf[off:] + data
        self.base = self.pos
        return True

    def take(self, budget):
        """(records, total cost): backlog items from the buffer, in order, until their
        cost reaches `budget` (at least one when one is buffered and no more than
        TAKE_RECORDS records were looked at).  Damaged when the next record fails its
        check (records before it are returned first)."""
        out, spent, looked = [], 0, 0
        buf, base = self.buf, self.base
        n = len(buf)
        while self.items and spent < budget and looked < TAKE_RECORDS:
            looked += 1
            p = self.pos - base
            if n - p < HEADER_BYTES:
                break
            length, crc = HEADER.unpack_from(buf, p)
            end = p + HEADER_BYTES + length
            if end > n:
                break
            op = buf[p + HEADER_BYTES]
            if op != OP_ADD or length < ADD_BODY_MIN:
                if not body_fits(op, length):
                    return self._damaged(out, spent, base + end, length >= ADD_BODY_MIN)
                self.pos = base + end        # a head operation, already applied
                continue
            if zlib.crc32(memoryview(buf)[p + HEADER_BYTES:end]) != crc:
                return self._damaged(out, spent, base + end, True)
            record = buf[p:end]
            out.append(record)
            spent += cost(record)
            self._taken(base + end, length)
        return out, spent

    def _damaged(self, out, spent, end, item):
        """What was taken before a damaged record; Damaged when that is nothing."""
        if out:
            return out, spent
        raise Damaged(self.pos, end, item)

    def _taken(self, end, length):
        self.pos = end
        self.items -= 1
        self.bytes -= length - ADD_BODY_MIN
        self.consumed += HEADER_BYTES + length

    def skip(self, damaged):
        """Step over the damaged item record `damaged` (a Damaged), counted as gone."""
        self._taken(damaged.end, damaged.end - damaged.at - HEADER_BYTES)
        self.consumed -= damaged.end - damaged.at
