"""Reading a queue's journal back at start: replay with read-behind, torn tails, damage.

What it is for: `load(path, memory_bytes)` rebuilds one queue from its journal without
holding the whole queue in memory: the replay follows the queue as positions in the
file (a second reader, `_Stream`, lags the first and steps over one live item per
removal), and only at the end reads the oldest items into memory, up to `memory_bytes`;
the rest is described by where it starts in the file (a backlog, see backlog.py).

Checks, fast path: every head operation is checked (crc) as it is applied, and every item
record is checked when it is read into memory (here, or later when read back), so each
byte that matters is checked once; item records that were removed long ago are only
stepped over.  An incomplete last record (a write cut short by a crash) is a torn tail:
the file is truncated there, as Kestrel does.

Anything else that fails a check (a damaged record in the middle, a damaged complete
last record, a head operation that refers to nothing) sends the file to `_recover`:
a second replay checks every record, and where one fails it continues at the next valid
record (the damaged record's own length when a valid record follows it, else the first
offset where two valid records follow each other).  The rule that keeps the head
operations after a gap consistent: the items whose ADD records were in the gap are
replaced by placeholders (exactly one for one damaged item record; for a run of
unreadable bytes, as many as could fit, len // 25), so a later removal takes the item
it took originally or, when the gap held fewer items, one that was already delivered:
an item after the gap is never dropped in place of a lost one.  A removal lost in the
gap can only make an item come back once more (at-least-once).  Head operations that
refer to nothing (removal from an empty queue, close or abort of an unknown read) are
skipped.  Placeholders still queued or open at the end are the items lost.  The damaged
file is kept as `<queue>.damaged-<unix time>` (a hard link, or a copy), and a clean
journal of what was recovered replaces it (temp file, fsync, rename): nothing is
truncated in place.

What it must not do: run after the server accepts connections (it blocks; the caller
loads every journal before listening), or hold more than the memory bound of items.
"""
import collections
import logging
import os
import re
import shutil
import struct
import time
import zlib

from ingest.fileio import fsync_dir
from ingest.queue import journal as jr
from ingest.queue.backlog import cost
from ingest.queue.journal import ADD_BODY_MIN, HEADER, HEADER_BYTES, OP_ADD

log = logging.getLogger("ingest.queue.journal")

PLACEHOLDER = None          # an item whose ADD record was lost to damage
CHUNK = 4 << 20             # bytes per read of the replay
STREAM_CHUNK = 1 << 20      # bytes per read of the lagging reader
RESYNC_WINDOW = 1 << 20
ADD_RECORD_MIN = HEADER_BYTES + ADD_BODY_MIN          # 25: the smallest item record
REMOVE_CRC = HEADER.unpack_from(jr.REMOVE_RECORD)[1]
_LENGTH = struct.Struct("<I")                         # a record's length field
# A valid record has its opcode at offset 8: the candidates a resync scan tries.
_OPCODE = re.compile(rb"[\x01-\x06]")


class NeedRecovery(Exception):
    """The fast replay found damage; `_recover` checks every record."""

    def __init__(self, at, reason):
        super().__init__("%s at offset %d" % (reason, at))
        self.at, self.reason = at, reason


class Loaded:
    """One queue as read back: `head` the items in memory (oldest first), `open` reads
    open at the end (xid -> record), the backlog `(pos, items, bytes)` or None, `lost`
    items lost to damage, `size` of the file afterwards."""

    def __init__(self, head, open_reads, max_xid, backlog, lost, size):
        self.head, self.open, self.max_xid = head, open_reads, max_xid
        self.backlog, self.lost, self.size = backlog, lost, size


class _Gap:
    """Bytes [start, resume) that failed a check: `placeholders` items lost there, or
    `repaired`, the one record they hold with its length field put right."""

    __slots__ = ("start", "resume", "placeholders", "repaired")

    def __init__(self, start, resume, placeholders, repaired):
        self.start, self.resume = start, resume
        self.placeholders, self.repaired = placeholders, repaired


class _Stream:
    """The live items after `head`, as positions: from `pos` on, `items` ADD records
    (or placeholders at the gaps) are still queued."""

    def __init__(self, fd, gaps):
        self.fd, self.gaps = fd, gaps
        self.pos = self.items = self.bytes = 0
        self.buf, self.base = b"", 0
        self.placeholders = self.gap_i = 0

    def _cover(self, n):
        off = self.pos - self.base
        if 0 <= off and len(self.buf) - off >= n:
            return off
        self.buf, self.base = os.pread(self.fd, max(STREAM_CHUNK, n), self.pos), self.pos
        if len(self.buf) < n:
            raise NeedRecovery(self.pos, "queue state runs past the end of the file")
        return 0

    def reset(self, pos):
        """A FLUSH ending at `pos`: nothing before it is queued."""
        self.pos, self.items, self.bytes, self.placeholders = pos, 0, 0, 0
        while self.gap_i < len(self.gaps) and self.gaps[self.gap_i].start < pos:
            self.gap_i += 1

    def next(self, body):
        """Step over the oldest live item: its record (crc checked) when `body`, else
        True; PLACEHOLDER for one lost to damage."""
        while True:
            if self.placeholders:
                self.placeholders -= 1
                self.items -= 1
                return PLACEHOLDER
            if self.gap_i < len(self.gaps) and self.gaps[self.gap_i].start == self.pos:
                gap = self.gaps[self.gap_i]
                self.gap_i += 1
                self.pos, self.placeholders = gap.resume, gap.placeholders
                record = gap.repaired
                if record is not None and record[HEADER_BYTES] == OP_ADD:
                    self.items -= 1
                    self.bytes -= len(record) - jr.DATA_OFFSET
                    return record if body else True
                continue
            off = self._cover(HEADER_BYTES + 1)
            length, crc = HEADER.unpack_from(self.buf, off)
            end = self.pos + HEADER_BYTES + length
            if self.buf[off + HEADER_BYTES] != OP_ADD:
                self.pos = end
                continue
            self.items -= 1
            self.bytes -= length - ADD_BODY_MIN
            if not body:
                self.pos = end
                return True
            off = self._cover(HEADER_BYTES + length)
            record = self.buf[off:off + HEADER_BYTES + length]
            if zlib.crc32(memoryview(record)[HEADER_BYTES:]) != crc:
                raise NeedRecovery(self.pos, "checksum mismatch")
            self.pos = end
            return record


class _Replay:
    """One pass over a journal.  verify=False: the fast path (NeedRecovery on damage);
    verify=True: every record checked, gaps and placeholders, nothing refused."""

    def __init__(self, fd, size, verify):
        self.fd, self.size, self.verify = fd, size, verify
        self.gaps = []
        self.stream = _Stream(fd, self.gaps)
        self.head = collections.deque()      # items put back at the head (records)
        self.open = {}                       # xid -> record (or PLACEHOLDER)
        self.max_xid = 0
        self.skipped = 0                     # head operations that referred to nothing
        self.repaired = 0                    # records whose length field was put right
        self.tail = None                     # a bad tail: see _damage

    def scan(self):
        pos = 0
        while pos < self.size:
            buf = os.pread(self.fd, CHUNK, pos)
            stop, bad = self._chunk(buf, pos)
            if not bad and stop == pos:          # a record bigger than CHUNK, or the tail
                stop, bad = self._whole(pos)
            pos = self._damage(stop) if bad else stop
        return self

    def _chunk(self, buf, base):
        """Apply every complete record in `buf` (file offset `base`).  Returns (file
        offset where it stopped, True when it stopped at a record that fails a check)."""
        unpack, fast = HEADER.unpack_from, not self.verify
        n, p = len(buf), 0
        while n - p >= HEADER_BYTES + 1:
            if fast and buf[p + HEADER_BYTES] == OP_ADD:
                p = self._adds(buf, p, n)
                if n - p < HEADER_BYTES + 1:
                    break
            length, crc = unpack(buf, p)
            end = p + HEADER_BYTES + length
            if end > n:
                break
            op = buf[p + HEADER_BYTES]
            if op == jr.OP_REMOVE and length == 1 and crc == REMOVE_CRC:
                self._pop(False)
            elif not self._record(buf, p, end, op, length, crc, base + end):
                return base + p, True
            p = end
        return base + p, False

    def _adds(self, buf, p, n):
        """Step over the run of item records at `p` (the fast path); returns where the
        run ends.  PERF: item records are only stepped over here (each is checked when
        read into memory), in this tight loop: the whole replay of 2M x 1 KiB records
        took 0.9-1.0 s of CPU, against 1.1-1.3 s with the general loop and ~4.7 s when
        every record's crc was computed (2.3 us per record)."""
        length_at, start, count, last = _LENGTH.unpack_from, p, 0, n - HEADER_BYTES - 1
        while p <= last and buf[p + HEADER_BYTES] == OP_ADD:
            end = p + HEADER_BYTES + length_at(buf, p)[0]
            if end > n or end - p < ADD_RECORD_MIN:
                break
            p = end
            count += 1
        self.stream.items += count
        self.stream.bytes += p - start - ADD_RECORD_MIN * count
        return p

    def _whole(self, pos):
        """The record at `pos` when it did not fit in one read: an item record bigger
        than CHUNK (its crc is computed piecewise: a damaged length cannot make the
        replay allocate it), or a bad tail."""
        header = os.pread(self.fd, HEADER_BYTES + 1, pos)
        if len(header) <= HEADER_BYTES:
            return pos, True
        length, crc = HEADER.unpack_from(header)
        end = pos + HEADER_BYTES + length
        if end > self.size or header[HEADER_BYTES] != OP_ADD or length < ADD_BODY_MIN:
            return pos, True
        if self.verify and not self._crc_ok(pos, length, crc):
            return pos, True
        self.stream.items += 1
        self.stream.bytes += length - ADD_BODY_MIN
        return end, False

    def _crc_ok(self, pos, length, crc):
        value, at, end = 0, pos + HEADER_BYTES, pos + HEADER_BYTES + length
        while at < end:
            data = os.pread(self.fd, min(CHUNK, end - at), at)
            if not data:
                return False
            value = zlib.crc32(data, value)
            at += len(data)
        return value == crc

    def _record(self, buf, p, end, op, length, crc, file_end):
        """Check and apply one record; False when it fails its check."""
        if not jr.body_fits(op, length) or \
                zlib.crc32(memoryview(buf)[p + HEADER_BYTES:end]) != crc:
            return False
        if op == OP_ADD:
            self.stream.items += 1
            self.stream.bytes += length - ADD_BODY_MIN
        elif op == jr.OP_REMOVE:
            self._pop(False)
        elif op == jr.OP_FLUSH:
            self.head.clear()
            self.stream.reset(file_end)
        else:
            self._xid(op, jr.XID_BODY.unpack_from(buf, p + HEADER_BYTES)[1], file_end)
        return True

    def _xid(self, op, xid, at):
        self.max_xid = max(self.max_xid, xid)
        if op == jr.OP_OPEN:
            if xid in self.open:
                return self._inconsistent(at, "read %d opened twice" % xid)
            record = self._pop(True)
            if record is not False:
                self.open[xid] = record
        elif op == jr.OP_CONFIRM:
            if self.open.pop(xid, False) is False:
                self._inconsistent(at, "close of unknown read %d" % xid)
        elif xid in self.open:
            self.head.appendleft(self.open.pop(xid))
        else:
            self._inconsistent(at, "abort of unknown read %d" % xid)

    def _pop(self, body):
        """Remove the head item: its record (body) / True, or False if there is none."""
        if self.head:
            return self.head.popleft()
        if self.stream.items:
            return self.stream.next(body)
        return self._inconsistent(self.stream.pos, "removal from an empty queue")

    def _inconsistent(self, at, what):
        if not self.verify:
            raise NeedRecovery(at, what)
        self.skipped += 1
        return False

    # -- damage
    def _damage(self, at):
        """The record at `at` fails its check: skip to the next valid record (a gap), or
        end at a bad tail.  Returns where the scan continues."""
        resume = self._resume(at)
        if resume is None:
            header = os.pread(self.fd, HEADER_BYTES, at)
            end = at + HEADER_BYTES + HEADER.unpack_from(header)[0] \
                if len(header) == HEADER_BYTES else self.size + 1
            if end <= self.size and not self.verify:
                raise NeedRecovery(at, "damaged last record")
            # (offset, incomplete?, one damaged item record that ends the file?)
            self.tail = (at, end > self.size,
                         end == self.size and end - at >= ADD_RECORD_MIN)
            return self.size
        if not self.verify:
            raise NeedRecovery(at, "damaged record")
        gap = _Gap(at, *resume)
        self.gaps.append(gap)
        if gap.repaired is None:
            self.stream.items += gap.placeholders
        else:
            self.repaired += 1
            record = gap.repaired
            self._record(record, 0, len(record), record[HEADER_BYTES],
                         len(record) - HEADER_BYTES, HEADER.unpack_from(record)[1], gap.resume)
        return gap.resume

    def _resume(self, at):
        """(offset of the next valid record, placeholders for the gap, the repaired
        record or None), or None when no valid record follows."""
        header = os.pread(self.fd, HEADER_BYTES, at)
        if len(header) == HEADER_BYTES:
            length = HEADER.unpack_from(header)[0]
            end = at + HEADER_BYTES + length
            if end < self.size and self._chain(end):
                return end, (1 if length >= ADD_BODY_MIN else 0), None
        start = self._resync(at + 1)
        if start is None:
            return None
        repaired = self._repair(at, start)
        if repaired is not None:
            return start, 0, repaired
        return start, (start - at) // ADD_RECORD_MIN, None

    def _repair(self, at, end):
        """The record at `at` if only its length field is damaged: its crc matches the
        bytes up to `end`, the next valid record (the header's length is not covered by
        the crc; one flipped bit there would otherwise lose the record)."""
        length = end - at - HEADER_BYTES
        head = os.pread(self.fd, HEADER_BYTES + 1, at)
        if len(head) <= HEADER_BYTES or not jr.body_fits(head[HEADER_BYTES], length):
            return None
        crc = HEADER.unpack_from(head)[1]
        if not self._crc_ok(at, length, crc):
            return None
        return HEADER.pack(length, crc) + os.pread(self.fd, length, at + HEADER_BYTES)

    def _frame(self, pos):
        """End of the valid record at `pos`, or None."""
        header = os.pread(self.fd, HEADER_BYTES + 1, pos)
        if len(header) <= HEADER_BYTES:
            return None
        length, crc = HEADER.unpack_from(header)
        end = pos + HEADER_BYTES + length
        if end > self.size or not jr.body_fits(header[HEADER_BYTES], length):
            return None
        return end if self._crc_ok(pos, length, crc) else None

    def _chain(self, pos):
        end = self._frame(pos)
        return end is not None and (end == self.size or self._frame(end) is not None)

    def _resync(self, start):
        pos = start
        while pos < self.size:
            buf = os.pread(self.fd, RESYNC_WINDOW + HEADER_BYTES, pos)
            for match in _OPCODE.finditer(buf, HEADER_BYTES):
                cand = pos + match.start() - HEADER_BYTES
                if cand >= pos + RESYNC_WINDOW:
                    break
                length = HEADER.unpack_from(buf, match.start() - HEADER_BYTES)[0]
                if jr.body_fits(buf[match.start()], length) and \
                        cand + HEADER_BYTES + length <= self.size and self._chain(cand):
                    return cand
            pos += RESYNC_WINDOW
        return None

    # -- results
    def memory(self, memory_bytes):
        """The fast path's result: the head and the oldest items up to the bound."""
        items = list(self.head)
        spent = sum(map(cost, items))
        stream = self.stream
        while stream.items and (spent < memory_bytes or not items):
            record = stream.next(True)
            items.append(record)
            spent += cost(record)
        backlog = (stream.pos, stream.items, stream.bytes) if stream.items else None
        return items, backlog

    def clean_records(self, counts):
        """Every recovered record for a clean journal; counts["lost"] += placeholders."""
        opened = [(xid, r) for xid, r in self.open.items() if r is not PLACEHOLDER]
        counts["lost"] += len(self.open) - len(opened)
        yield from (r for _, r in opened)
        yield from (jr.encode_xid(jr.OP_OPEN, xid) for xid, _ in opened)
        for record in self.head:
            if record is PLACEHOLDER:
                counts["lost"] += 1
            else:
                yield record
        while self.stream.items:
            record = self.stream.next(True)
            if record is PLACEHOLDER:
                counts["lost"] += 1
            else:
                yield record


def load(path, memory_bytes):
    """Read the journal at `path` back (see the module docstring) -> Loaded."""
    lost = 0
    for attempt in (1, 2):
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            replay = _Replay(fd, size, verify=False)
            try:
                items, backlog = replay.scan().memory(memory_bytes)
            except NeedRecovery as why:
                if attempt == 2:
                    raise
                lost = _recover(path, fd, size, why)
                continue
        finally:
            os.close(fd)
        if replay.tail is not None:
            size = _truncate_torn(path, replay.tail[0], size)
        return Loaded(items, replay.open, replay.max_xid, backlog, lost, size)


def _truncate_torn(path, at, size):
    log.warning("journal %s: incomplete last record at offset %d (a write cut short);"
                " truncated %d trailing bytes", path, at, size - at)
    with open(path, "r+b") as fh:
        fh.truncate(at)
        fh.flush()
        os.fsync(fh.fileno())
    return at


def _recover(path, fd, size, why):
    """Replace a damaged journal with what can be recovered; returns the items lost."""
    log.error("journal %s: %s; recovering every valid record", path, why)
    replay = _Replay(fd, size, verify=True).scan()
    counts = {"lost": 0}
    if replay.tail is not None and replay.tail[2]:
        counts["lost"] += 1                  # a damaged complete last item record
    tmp = path + "~~recover"
    out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for chunk in jr.join_records(replay.clean_records(counts)):
            jr.write_chunk(out, chunk)
        os.fsync(out)
    except BaseException:
        os.unlink(tmp)                       # the damaged journal is left as it was
        raise
    finally:
        os.close(out)
    aside = keep_aside(path)
    os.rename(tmp, path)
    fsync_dir(os.path.dirname(path))
    gaps = [g for g in replay.gaps if g.repaired is None]
    unreadable = sum(g.resume - g.start for g in gaps)
    if replay.tail is not None:
        unreadable += size - replay.tail[0]
    log.error("journal %s: recovered; %d unreadable bytes in %d places, %d items lost,"
              " %d records repaired, %d head operations skipped; the damaged file is kept"
              " as %s", path, unreadable, len(gaps) + (replay.tail is not None),
              counts["lost"], replay.repaired, replay.skipped, aside)
    return counts["lost"]


def keep_aside(path):
    """Keep the journal's current bytes as `<path>.damaged-<time>` (a hard link: the
    file is never changed in place afterwards; a copy where links are refused)."""
    stamp = int(time.time())
    for n in range(100):
        aside = "%s.damaged-%d%s" % (path, stamp, "-%d" % n if n else "")
        if not os.path.exists(aside):
            break
    try:
        os.link(path, aside)
    except OSError:
        shutil.copyfile(path, aside)
    return aside
