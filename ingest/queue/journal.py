"""Append-only per-queue journal of the bundled queue server: record format and writer.

Every record is `<u32 body length><u32 crc32(body)>` + body, little-endian, where body
starts with a one-byte opcode:

    ADD      1  <i64 add time ms><i64 expiry ms or 0><data>  append at the tail
    REMOVE   2                                                drop the head for good
    OPEN     3  <u64 xid>                                     head -> open read `xid`
    CONFIRM  4  <u64 xid>                                     open read `xid` done
    UNREMOVE 5  <u64 xid>                                     open read `xid` -> head
    FLUSH    6                                                drop every queued item

All head operations are journaled in the order they happen in memory, so replaying the
file rebuilds the exact queue (replay.py).  The length + crc let a reader tell a valid
record from a torn or damaged one (`frame_end`).  The in-memory form of a queued item IS its ADD record (bytes),
so a rewrite writes memory back verbatim and the read-behind reads items back verbatim.

What it must not do: sockets or eventlet (`Journal` does plain blocking file I/O: os.write
to the file before the reply, fsync when the server's sync policy says so), or know
about queues beyond the records: store.py keeps the queue, replay.py reads files back.
"""
import logging
import os
import posix
import struct
import zlib

from ingest.fileio import write_all

log = logging.getLogger("ingest.queue.journal")

# Exit status after a journal I/O error (EX_TEMPFAIL): supervisord restarts the server,
# which replays the journals as they are on disk and truncates the torn tail.
EXIT_IO_ERROR = 75

OP_ADD, OP_REMOVE, OP_OPEN, OP_CONFIRM, OP_UNREMOVE, OP_FLUSH = 1, 2, 3, 4, 5, 6

HEADER = struct.Struct("<II")          # body length, crc32(body)
ADD_PREFIX = struct.Struct("<Bqq")     # op, add ms, expiry ms
XID_BODY = struct.Struct("<BQ")        # op, xid
HEADER_BYTES = HEADER.size             # 8
DATA_OFFSET = HEADER_BYTES + ADD_PREFIX.size   # 25: where data starts in an ADD record
ADD_BODY_MIN = ADD_PREFIX.size         # 17: the shortest ADD body (empty item)
ADD_MS = struct.Struct("<q")           # read at offset 9 (add) / 17 (expiry) of a record
EXPIRY_OFFSET = HEADER_BYTES + 9
ADD_OFFSET = HEADER_BYTES + 1
# The body length each opcode must have (ADD: at least ADD_BODY_MIN).
BODY_BYTES = {OP_REMOVE: 1, OP_FLUSH: 1, OP_OPEN: XID_BODY.size,
              OP_CONFIRM: XID_BODY.size, OP_UNREMOVE: XID_BODY.size}
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


def encode_adds(datas, add_ms, expiry_ms):
    """encode_add() of each of `datas` (all added at `add_ms`, expiring at `expiry_ms`).

    PERF: the prefix and its CRC are computed once: 22 against 39 us for 50 items."""
    prefix = ADD_PREFIX.pack(OP_ADD, add_ms, expiry_ms)
    seed, body, pack, crc32 = zlib.crc32(prefix), len(prefix), HEADER.pack, zlib.crc32
    return [pack(body + len(data), crc32(data, seed)) + prefix + data for data in datas]


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


# ---- checking frames --------------------------------------------------------------------

def body_fits(op, length):
    """True when a body of `length` bytes is what opcode `op` carries."""
    if op == OP_ADD:
        return length >= ADD_BODY_MIN
    return BODY_BYTES.get(op) == length


def frame_end(buf, pos, n):
    """The end offset of the valid record at `pos` in buf[:n], or None: the record must be
    complete, its crc must match and its opcode must be known with a body that fits."""
    if n - pos < HEADER_BYTES:
        return None
    length, crc = HEADER.unpack_from(buf, pos)
    end = pos + HEADER_BYTES + length
    if length < 1 or length > MAX_BODY_BYTES or end > n:
        return None
    if not body_fits(buf[pos + HEADER_BYTES], length):
        return None
    if zlib.crc32(memoryview(buf)[pos + HEADER_BYTES:end]) != crc:
        return None
    return end


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
    `generation` changes whenever the file's bytes stop meaning what they meant (truncate,
    swap for a rewritten file, removal), so a read started before can tell it is stale.
    """

    def __init__(self, path):
        self.path = path
        self.pending = []
        self.pending_bytes = 0
        self.dirty = False          # written since the last fsync
        self.dir_dirty = False      # the file was renamed into place; fsync the directory
        self.generation = 0
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.size = os.fstat(self.fd).st_size
        self.read_fd = None         # opened when items are read back (read-behind)

    @property
    def end(self):
        """The offset the next appended record will have."""
        return self.size + self.pending_bytes

    def append(self, record):
        self.pending.append(record)
        self.pending_bytes += len(record)

    def extend(self, records):
        self.pending.extend(records)
        self.pending_bytes += sum(map(len, records))

    def write(self):
        """Write everything buffered with one os.write (looping only on a short write).

        A failed write is fatal (see fatal_io_error): the in-memory queue would no longer
        match the file, and records appended after a half-written one would be cut off
        at the next replay.  What it did write is cut off first, so nothing of the batch
        (whose replies were never sent) comes back after the restart."""
        if not self.pending:
            return
        data = self.pending[0] if len(self.pending) == 1 else b"".join(self.pending)
        self.pending.clear()
        self.pending_bytes = 0
        try:
            _write_all(self.fd, data)
        except OSError as exc:
            try:                # a half-written batch is not left behind (no duplicates)
                os.ftruncate(self.fd, self.size)
            except OSError:
                pass            # the restart cuts it as a torn tail
            fatal_io_error("journal write to %s" % self.path, exc)
        self.size += len(data)
        self.dirty = True

    def fsync(self):
        fd = self.fd
        if fd is not None:
            os.fsync(fd)

    def reader(self):
        """A read-only descriptor of the current file (for reading items back)."""
        if self.read_fd is None:
            self.read_fd = os.open(self.path, os.O_RDONLY)
        return self.read_fd

    def read(self, at, n):
        """Up to `n` bytes of the file at offset `at` (plain blocking pread)."""
        return os.pread(self.reader(), n, at)

    def truncate(self, close_fd):
        """Drop the whole file's content (the queue holds nothing, no reads are open)."""
        self.pending.clear()
        self.pending_bytes = 0
        os.ftruncate(self.fd, 0)
        self.size = 0
        self.dirty = True
        self._stale(close_fd)

    def swap(self, fd, size, close_fd):
        """Adopt `fd` (a rewritten file already renamed over this path, `size` bytes long);
        the old descriptors go to `close_fd` because a sync thread may be using them."""
        old, self.fd, self.size = self.fd, fd, size
        self.dirty = self.dir_dirty = True
        close_fd(old)
        self._stale(close_fd)

    def _stale(self, close_fd):
        self.generation += 1
        if self.read_fd is not None:
            close_fd(self.read_fd)
            self.read_fd = None

    def close(self):
        if self.fd is not None:
            self.write()
            os.close(self.fd)
            self.fd = None
        if self.read_fd is not None:
            os.close(self.read_fd)
            self.read_fd = None

    def remove(self, close_fd):
        """Delete the file (queue deleted); the descriptors go to `close_fd`."""
        self.pending.clear()
        self.pending_bytes = 0
        fd, self.fd = self.fd, None
        close_fd(fd)
        self._stale(close_fd)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def join_records(records, chunk_bytes=4 * 1024 * 1024):
    """Records joined into ~4 MiB pieces: a big queue is not copied whole a second time."""
    batch, batch_bytes = [], 0
    for record in records:
        batch.append(record)
        batch_bytes += len(record)
        if batch_bytes >= chunk_bytes:
            yield b"".join(batch)
            batch, batch_bytes = [], 0
    if batch:
        yield b"".join(batch)


def _write_all(fd, data):
    # _raw_write is looked up at each call, so tests can stand in a failing write.
    write_all(fd, data, _raw_write)


def write_chunk(fd, data):
    """Write `data` fully to `fd` (a rewrite's temp file); errors propagate."""
    _write_all(fd, data)
