"""Append-only per-queue journal of the bundled queue server: record format and replay.

Every record is `<u32 body length><u32 crc32(body)>` + body, little-endian, where body
starts with a one-byte opcode:

    ADD      1  <i64 add time ms><i64 expiry ms or 0><data>  append at the tail
    REMOVE   2                                                drop the head for good
    OPEN     3  <u64 xid>                                     head -> open read `xid`
    CONFIRM  4  <u64 xid>                                     open read `xid` done
    UNREMOVE 5  <u64 xid>                                     open read `xid` -> head
    FLUSH    6                                                drop every queued item

All head operations are journaled in the order they happen in memory, so replaying the
file rebuilds the exact queue.  The length + crc detect a torn tail (a write cut short
by a crash) or garbage: replay stops at the first bad record and reports its offset,
and the server truncates the file there.  The in-memory form of a queued item IS its
ADD record (bytes), so a compacting rewrite writes memory back verbatim.

The module has three parts: the record format (encode_*, item_*), replay (iter_records,
replay_bytes: pure, bytes in, state out; load: the file, truncating a torn tail), and
`Journal`, the writer of one queue's file.

What it must not do: sockets or eventlet (`Journal` does plain blocking file I/O: os.write
to the file before the reply, fsync when the server's sync policy says so), or know
about queues beyond the records: store.py keeps the queue in memory.
"""
import collections
import logging
import os
import posix
import struct
import zlib

from ingest.fileio import fsync_dir, write_all

log = logging.getLogger("ingest.queue.journal")

# Exit status after a journal I/O error (EX_TEMPFAIL): supervisord restarts the server,
# which replays the journals as they are on disk and truncates the torn tail.
EXIT_IO_ERROR = 75

OP_ADD, OP_REMOVE, OP_OPEN, OP_CONFIRM, OP_UNREMOVE, OP_FLUSH = 1, 2, 3, 4, 5, 6
_OPS = frozenset((OP_ADD, OP_REMOVE, OP_OPEN, OP_CONFIRM, OP_UNREMOVE, OP_FLUSH))

HEADER = struct.Struct("<II")          # body length, crc32(body)
ADD_PREFIX = struct.Struct("<Bqq")     # op, add ms, expiry ms
XID_BODY = struct.Struct("<BQ")        # op, xid
HEADER_BYTES = HEADER.size             # 8
DATA_OFFSET = HEADER_BYTES + ADD_PREFIX.size   # 25: where data starts in an ADD record
ADD_MS = struct.Struct("<q")           # read at offset 9 (add) / 17 (expiry) of a record
EXPIRY_OFFSET = HEADER_BYTES + 9
ADD_OFFSET = HEADER_BYTES + 1
# PERF: the C write, not `os.write`: under eventlet's monkey patching os.write becomes a
# green wrapper that fstat()s the fd on every call to learn it is a regular file (which
# never blocks in the eventlet sense), an extra syscall per batch for nothing.
_raw_write = posix.write
# A body longer than this is treated as corruption, not as a reason to allocate.
MAX_BODY_BYTES = 1 << 31


# ---- the record format ------------------------------------------------------------------

def encode_add(data, add_ms, expiry_ms):
    """The ADD record for one item; also the item's in-memory form."""
    prefix = ADD_PREFIX.pack(OP_ADD, add_ms, expiry_ms)
    crc = zlib.crc32(data, zlib.crc32(prefix))
    return HEADER.pack(len(prefix) + len(data), crc) + prefix + data


def _simple(body):
    return HEADER.pack(len(body), zlib.crc32(body)) + body


REMOVE_RECORD = _simple(bytes((OP_REMOVE,)))
FLUSH_RECORD = _simple(bytes((OP_FLUSH,)))


def encode_xid(op, xid):
    """OPEN, CONFIRM or UNREMOVE record for open read `xid`."""
    return _simple(XID_BODY.pack(op, xid))


def item_data(record):
    """The payload of an ADD record (a copy)."""
    return record[DATA_OFFSET:]


def item_size(record):
    return len(record) - DATA_OFFSET


def item_expiry_ms(record):
    return ADD_MS.unpack_from(record, EXPIRY_OFFSET)[0]


def item_add_ms(record):
    return ADD_MS.unpack_from(record, ADD_OFFSET)[0]


# ---- replay -----------------------------------------------------------------------------

class Replayed:
    """What replaying a journal produced: queued items, open reads, and where it stopped."""

    def __init__(self):
        self.items = collections.deque()     # ADD records, head first
        self.open = {}                       # xid -> ADD record, in opening order
        self.max_xid = 0
        self.good_bytes = 0                  # length of the valid prefix of the file
        self.torn = False                    # True when bytes after good_bytes were bad
        self.reason = ""


def iter_records(buf):
    """Yield (offset, body memoryview, record end) for each valid record; stop at the
    first torn/corrupt one.  The generator's return value is (end, reason or '')."""
    view = memoryview(buf)
    pos, n = 0, len(buf)
    while pos < n:
        if n - pos < HEADER_BYTES:
            return pos, "short header"
        length, crc = HEADER.unpack_from(buf, pos)
        end = pos + HEADER_BYTES + length
        if length < 1 or length > MAX_BODY_BYTES or end > n:
            return pos, "record runs past end of file"
        body = view[pos + HEADER_BYTES:end]
        if zlib.crc32(body) != crc:
            return pos, "checksum mismatch"
        if body[0] not in _OPS:
            return pos, "unknown opcode %d" % body[0]
        yield pos, body, end
        pos = end
    return pos, ""


def replay_bytes(buf):
    """Rebuild queue state from journal bytes.  Pure: no files, no clock."""
    state = Replayed()
    records = iter_records(buf)
    while True:
        try:
            pos, body, end = next(records)
        except StopIteration as stop:
            state.good_bytes, state.reason = stop.value
            state.torn = state.good_bytes < len(buf)
            return state
        if not _apply(state, body, buf, pos, end):
            state.good_bytes, state.reason, state.torn = pos, "inconsistent record", True
            return state


def _apply(state, body, buf, pos, end):
    """Apply one record; False when it cannot apply (treated as corruption)."""
    op = body[0]
    if op == OP_ADD:
        if len(body) < ADD_PREFIX.size:
            return False
        state.items.append(bytes(buf[pos:end]))
    elif op == OP_REMOVE:
        if not state.items:
            return False
        state.items.popleft()
    elif op == OP_FLUSH:
        state.items.clear()
    else:
        if len(body) != XID_BODY.size:
            return False
        xid = XID_BODY.unpack(body)[1]
        state.max_xid = max(state.max_xid, xid)
        return _apply_xid(state, op, xid)
    return True


def _apply_xid(state, op, xid):
    if op == OP_OPEN:
        if not state.items or xid in state.open:
            return False
        state.open[xid] = state.items.popleft()
    elif op == OP_CONFIRM:
        return state.open.pop(xid, None) is not None
    elif op == OP_UNREMOVE:
        record = state.open.pop(xid, None)
        if record is None:
            return False
        state.items.appendleft(record)
    return True

def load(path):
    """Replay the journal at `path`, truncating a torn tail in place (with a log line)."""
    with open(path, "rb") as fh:
        buf = fh.read()
    state = replay_bytes(buf)
    if state.torn:
        log.warning("journal %s: %s at offset %d; truncated %d trailing bytes"
                    " (data after that point may have been lost)",
                    path, state.reason, state.good_bytes, len(buf) - state.good_bytes)
        with open(path, "r+b") as fh:
            fh.truncate(state.good_bytes)
            fh.flush()
            os.fsync(fh.fileno())
    return state



# ---- the file of one queue ---------------------------------------------------------------

def fatal_io_error(what, exc):
    """Stop the server at once: nothing after a failed journal write or fsync may be
    acknowledged, and the journal on disk is the truth the restart replays."""
    log.critical("%s failed: %s; exiting so the journals are replayed from disk", what, exc)
    logging.shutdown()
    os._exit(EXIT_IO_ERROR)


class Journal:
    """One queue's journal file: buffered records of the current batch, one write each.

    `append` only buffers; `write` issues ONE os.write for everything buffered, which the
    server calls before it sends the replies of a batch (so a process crash after a reply
    loses nothing).  `fsync` is separate and driven by the server's sync policy.
    """

    def __init__(self, path):
        self.path = path
        self.pending = []
        self.dirty = False          # written since the last fsync
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.size = os.fstat(self.fd).st_size

    def append(self, record):
        self.pending.append(record)

    def write(self):
        """Write everything buffered with one os.write (looping only on a short write).

        A failed write is fatal (see fatal_io_error): the in-memory queue would no longer
        match the file, and records appended after a half-written one would be cut off
        at the next replay."""
        if not self.pending:
            return
        data = self.pending[0] if len(self.pending) == 1 else b"".join(self.pending)
        self.pending.clear()
        try:
            _write_all(self.fd, data)
        except OSError as exc:
            fatal_io_error("journal write to %s" % self.path, exc)
        self.size += len(data)
        self.dirty = True

    def fsync(self):
        fd = self.fd
        if fd is not None:
            os.fsync(fd)

    def truncate(self):
        """Drop the whole file's content (the queue holds nothing, no reads are open)."""
        self.pending.clear()
        os.ftruncate(self.fd, 0)
        self.size = 0
        self.dirty = True

    def rewrite(self, records, close_fd):
        """Replace the file with `records` (temp file, fsync, rename, fsync the dir).

        The old descriptor is handed to `close_fd` because a sync thread may be using it.
        """
        self.pending.clear()
        tmp = self.path + "~~rewrite"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        try:
            size = _write_records(fd, records)
            os.fsync(fd)
            os.rename(tmp, self.path)
        except BaseException:
            os.close(fd)
            raise
        fsync_dir(os.path.dirname(self.path))
        old, self.fd, self.size, self.dirty = self.fd, fd, size, False
        close_fd(old)

    def close(self):
        if self.fd is not None:
            self.write()
            os.close(self.fd)
            self.fd = None

    def remove(self, close_fd):
        """Delete the file (queue deleted); the descriptor goes to `close_fd`."""
        self.pending.clear()
        fd, self.fd = self.fd, None
        close_fd(fd)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _write_records(fd, records, chunk_bytes=4 * 1024 * 1024):
    """Write records in ~4 MiB joins: a big queue is not copied whole a second time."""
    batch, batch_bytes, total = [], 0, 0
    for record in records:
        batch.append(record)
        batch_bytes += len(record)
        if batch_bytes >= chunk_bytes:
            _write_all(fd, b"".join(batch))
            total += batch_bytes
            batch, batch_bytes = [], 0
    if batch:
        _write_all(fd, b"".join(batch))
        total += batch_bytes
    return total


def _write_all(fd, data):
    # _raw_write is looked up at each call, so tests can stand in a failing write.
    write_all(fd, data, _raw_write)

