"""Journal rewrites of `ingest queue`, in the background, without stalling the server.

What it is for: a journal that is mostly dead records (or a big drained one) is
rewritten to what its queue holds, by one green thread, one queue at a time, while the
server keeps serving:
  1. snapshot at offset S, between batches (so the file ends at S): the open reads (ADD
     + OPEN records), the items in memory, and where the backlog starts;
  2. write that to `<queue>~~rewrite`, then the backlog's item records read from the old
     file between the backlog's position and S (checked; head operations dropped):
     streamed, so the backlog is never held in memory;
  3. copy what was appended to the old file after S (those records replay correctly on
     top of the snapshot) and fsync, again until a round ends with nothing new;
  4. then on the loop, without yielding: copy the last records, rename over the journal,
     give the queue the new descriptor (Journal.swap) and move the backlog's position.
Writes, reads and fsyncs run in eventlet's tpool; parsing runs on the loop in steps of
at most 512 KiB and 4096 records.  A rewrite that fails (ENOSPC, EIO, damage) is abandoned cleanly: the temp file
is removed, the old journal was never touched, an error line says so, and the queue is
not tried again before a back-off (1 s, doubling up to 5 minutes).

What it must not do: change the old journal, hold a queue's backlog in memory, or run
two rewrites at once.
"""
import collections
import logging
import os
import posix
import time
import zlib

import eventlet
from eventlet import tpool

from ingest.queue import journal as jr
from ingest.queue.readahead import SerialWorker
from ingest.queue.syncer import close_later

log = logging.getLogger("ingest.queue")

STEP = 512 * 1024         # bytes per read, parse and write
ROUNDS = 5                # catch-up rounds before the rest is copied on the loop
MAX_BACKOFF_S = 300


class Abandon(Exception):
    """The queue was deleted or its journal replaced meanwhile: stop, nothing failed."""


class Compactor(SerialWorker):
    """Runs the rewrites the queues ask for (`want`), one at a time."""

    def __init__(self, close_fd, sync_ms):
        super().__init__()
        self.close_fd = close_fd
        self.sync_ms = sync_ms

    def want(self, q, force=False):
        """Rewrite `q` soon, unless it is being rewritten or backs off after a failure."""
        if q.compacting or q.deleted:
            return
        if not force and time.monotonic() < q.compact_after:
            return
        self._add(q)

    def work(self, q):
        if not q.deleted:
            self.compact(q)

    def compact(self, q):
        q.compacting = True
        try:
            _Rewrite(q, self.close_fd, self.sync_ms).run()
        except Abandon as why:
            log.info("queue %s: journal rewrite stopped: %s", q.name, why)
        except Exception as exc:   # noqa: BLE001 - logged; the old journal is intact
            q.compact_failures += 1
            delay = min(2 ** (q.compact_failures - 1), MAX_BACKOFF_S)
            q.compact_after = time.monotonic() + delay
            log.error("queue %s: journal rewrite abandoned: %s; the journal is unchanged,"
                      " next try in %d s", q.name, exc, delay,
                      exc_info=not isinstance(exc, OSError))
        else:
            q.compact_failures = 0
        finally:
            q.compacting = False
        if not q.deleted:
            q.maintain()


class _Rewrite:
    """One rewrite of one queue's journal (see the module docstring)."""

    def __init__(self, q, close_fd, sync_ms):
        self.q, self.j = q, q.journal
        self.generation = self.j.generation
        self.close_fd, self.sync_ms = close_fd, sync_ms
        self.tmp = self.j.path + "~~rewrite"
        self.written = 0
        self.new = self.old = None

    def _check(self):
        if self.q.deleted or self.q.journal is not self.j or \
                self.j.generation != self.generation:
            raise Abandon("the queue was deleted or its journal replaced")

    def run(self):
        q, start = self.q, self.j.size
        opened = collections.deque(q.open.values())
        xids = [jr.encode_xid(jr.OP_OPEN, xid) for xid in q.open]
        memory = collections.deque(q.items)
        backlog = q.backlog
        mark = (backlog, backlog.pos, backlog.consumed) if backlog else (None, start, 0)
        self.old = os.open(self.j.path, os.O_RDONLY)
        try:
            self.new = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND,
                               0o644)
            for records in (_drain(opened), xids, _drain(memory)):
                self._write_records(records)
            disk_start = self.written
            self._copy_items(mark[1], start)
            snapshot = self.written
            copied = self._catch_up(start)
            self._swap(start, copied, snapshot, disk_start, mark)
        except BaseException:
            fd, self.new = self.new, None
            tpool.execute(_discard, fd, self.tmp)
            raise
        finally:
            close_later(self.old)

    def _write(self, data):
        self._check()
        tpool.execute(jr.write_chunk, self.new, data)
        self.written += len(data)

    def _write_records(self, records):
        for chunk in jr.join_records(records, STEP):
            self._write(chunk)

    def _copy_items(self, pos, end):
        """The backlog's item records in old[pos:end), checked, without head operations."""
        rest = b""
        while pos < end:
            data = tpool.execute(posix.pread, self.old, min(STEP, end - pos), pos)
            self._check()
            if not data:
                raise OSError("the journal ends at %d, before %d" % (pos, end))
            buf, used, base = rest + data if rest else data, 0, pos - len(rest)
            while True:
                records, used, more = _items(buf, used, base)
                if records:
                    self._write(b"".join(records))
                if not more:
                    break
                eventlet.sleep(0)           # a long run of small records: let others run
            pos += len(data)
            rest = buf[used:]
        if rest:
            raise OSError("incomplete record at offset %d of the journal" % (end - len(rest)))

    def _catch_up(self, copied):
        """Copy what was appended since the snapshot, fsync; until nothing new came."""
        for _ in range(ROUNDS):
            while self.j.size > copied:
                data = tpool.execute(posix.pread, self.old, min(STEP, self.j.size - copied),
                                     copied)
                self._write(data)
                copied += len(data)
            tpool.execute(os.fsync, self.new)
            self._check()
            if self.j.size == copied:
                break
        return copied

    def _swap(self, start, copied, snapshot, disk_start, mark):
        """On the loop, no yield from here: the last records, rename, new descriptor."""
        self._check()
        j, before = self.j, self.j.size
        if j.size > copied:
            jr.write_chunk(self.new, os.pread(self.old, j.size - copied, copied))
            if self.sync_ms == 0:
                os.fsync(self.new)       # what was acknowledged must stay durable
        backlog, pos0, consumed0 = mark
        current, pos = self.q.backlog, None
        if current is not None:          # where the backlog's next item is in the new file
            if current is backlog and current.pos < start:
                pos = disk_start + current.consumed - consumed0
            else:
                pos = snapshot + current.pos - start
        os.rename(self.tmp, j.path)      # the last step that can fail
        j.swap(self.new, snapshot + j.size - start, self.close_fd)
        self.new = None
        if current is not None:
            current.pos = current.base = pos
            current.buf = b""
        self.q.rewrites += 1
        log.info("queue %s: journal rewritten, %d -> %d bytes", self.q.name, before, j.size)


def _drain(items):
    while items:
        yield items.popleft()   # written records are released as the rewrite goes


def _items(buf, p, base, limit=4096):
    """(item records, where parsing stopped, more?) for the complete records in `buf`
    from `p` on (file offset of buf[0]: `base`), at most `limit` records (then more is
    True); OSError for one that fails its check."""
    out, n = [], len(buf)
    while n - p > jr.HEADER_BYTES:
        if not limit:
            return out, p, True
        limit -= 1
        length, crc = jr.HEADER.unpack_from(buf, p)
        end = p + jr.HEADER_BYTES + length
        if end > n:
            break
        op = buf[p + jr.HEADER_BYTES]
        if op == jr.OP_ADD and length >= jr.ADD_BODY_MIN:
            if zlib.crc32(memoryview(buf)[p + jr.HEADER_BYTES:end]) != crc:
                raise OSError("damaged record at offset %d of the journal" % (base + p))
            out.append(buf[p:end])
        elif not jr.body_fits(op, length):
            raise OSError("damaged record at offset %d of the journal" % (base + p))
        p = end
    return out, p, False


def _discard(fd, path):
    """Runs in a worker thread: drop an abandoned rewrite's file."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    if fd is not None:
        posix.close(fd)
