"""The local disk spool: where records go when no Kestrel server takes them.

Acknowledgement rule (docs/durability.md): a request is answered as accepted only once
every record is STORED by Kestrel or appended here under the fsync policy.  So
`Spool.append(pairs)` writes one framed record per (queue, payload) to the active segment
with os.write (a process crash after it returns loses nothing), then fsyncs per `sync_ms`
(0 = before returning, group-committed: concurrent appenders share one fsync).  Frames
carry length and CRC-32, so a torn tail from a crash is detected and dropped at replay;
nothing before it is lost.  One process owns a spool directory at a time (an flock on
DIR/lock).  Reading it back is ingest/sinks/forwarder.py's job.

This module uses `threading` primitives only; under eventlet's monkey patching they are
green.  The blocking fsync is run through `run_blocking` (the worker passes
eventlet.tpool.execute) so other green threads keep serving meanwhile.
"""
import errno
import fcntl
import logging
import os
import re
import struct
import threading
import time
import zlib

from ingest.fileio import fsync_dir as _fsync_dir
from ingest.fileio import write_all as _write_all
from ingest.sinks import SinkUnavailable

log = logging.getLogger("ingest.spool")

# Frame: payload length, crc32(queue + payload), queue length; then queue, payload.
HEADER = struct.Struct("<IIH")
MAX_FRAME_PAYLOAD = 64 * 1024 * 1024
SEGMENT_RE = re.compile(r"^spool-(\d{16})\.seg$")
DEFAULT_SEGMENT_BYTES = 16 * 1024 * 1024


def encode_frame(queue, payload):
    q = queue.encode("utf-8")
    crc = zlib.crc32(payload, zlib.crc32(q))
    return HEADER.pack(len(payload), crc, len(q)) + q + payload


def read_frames(data, start=0):
    """Yield (end_offset, queue, payload) for every intact frame from `start`; stop at the
    first torn or corrupt one (the caller compares the last end offset with len(data))."""
    pos, n, size = start, len(data), HEADER.size
    while pos + size <= n:
        length, crc, qlen = HEADER.unpack_from(data, pos)
        end = pos + size + qlen + length
        if length > MAX_FRAME_PAYLOAD or end > n:
            return
        q = data[pos + size:pos + size + qlen]
        payload = data[pos + size + qlen:end]
        if zlib.crc32(payload, zlib.crc32(q)) != crc:
            return
        yield end, bytes(q).decode("utf-8", "replace"), bytes(payload)
        pos = end


def torn_tail(data, end):
    """Is what follows `end` one frame cut short (a crash mid-write), not damage?"""
    rest = len(data) - end
    if rest < HEADER.size:
        return True
    length, _crc, qlen = HEADER.unpack_from(data, end)
    return end + HEADER.size + qlen + length > len(data)



class SpoolFull(SinkUnavailable):
    pass


class Spool:
    def __init__(self, directory, sync_ms=0, max_bytes=1 << 30, segment_bytes=DEFAULT_SEGMENT_BYTES,
                 run_blocking=None, clock=time.monotonic):
        self.dir = directory
        self.sync_ms = sync_ms
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.run_blocking = run_blocking or (lambda f, *a: f(*a))
        self.clock = clock
        os.makedirs(directory, exist_ok=True)
        self._lock_fd = _lock_directory(directory)
        self._write_lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self.has_data = threading.Event()
        self._closed = False
        self._fd = None
        self._active_seq = None
        self._active_size = 0
        self._written = 0          # bytes appended to the active segment
        self._synced = 0           # of which fsynced
        self._dirty_since = None
        existing = self.segments()
        self.closed_bytes = sum(os.path.getsize(self.path(s)) for s in existing)
        self._next_seq = (existing[-1] + 1) if existing else 1
        if existing:
            self.has_data.set()
        self.appended_records = 0
        self.full = False          # set when an append was refused, until space frees up

    # -- layout --

    def path(self, seq):
        return os.path.join(self.dir, "spool-%016d.seg" % seq)

    def segments(self):
        """Sequence numbers of the segment files on disk, oldest first."""
        out = []
        for name in os.listdir(self.dir):
            m = SEGMENT_RE.match(name)
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    def size_bytes(self):
        return self.closed_bytes + self._active_size

    # -- writing --

    def append(self, pairs):
        """Durably append every (queue, payload); raises SpoolFull past the size cap."""
        buf = b"".join([encode_frame(q, p) for q, p in pairs])
        with self._write_lock:
            if self._closed:
                raise SinkUnavailable("spool is closed")
            if self.size_bytes() + len(buf) > self.max_bytes:
                self.full = True
                raise SpoolFull("spool is full (%d bytes)" % self.size_bytes(), retry_after_s=5)
            try:
                if self._fd is None or self._active_size >= self.segment_bytes:
                    self._rotate_locked()
                self._write_locked(buf)
            except OSError as exc:   # disk full, EMFILE, I/O error: not acknowledged
                log.error("spool write failed: %s", exc)
                raise SinkUnavailable("spool write failed: %s" % exc, retry_after_s=5) from None
            self._active_size += len(buf)
            self._written += len(buf)
            target = self._written
            fd, seq = self._fd, self._active_seq
            self.appended_records += len(pairs)
        self.has_data.set()
        if self.sync_ms == 0:
            self._sync_to(fd, seq, target)
        elif self._dirty_since is None:
            self._dirty_since = self.clock()

    def _sync_to(self, fd, seq, target):
        """Group commit: whoever holds the lock fsyncs everything written so far; the
        others find their bytes already synced when they get the lock.

        A rotation may close the segment meanwhile; it fsyncs before closing, so a
        closed segment (different seq, or EBADF from a closed fd) is already durable.
        `_synced` counts bytes of the active segment only, so it is updated only when
        the segment synced is still the active one."""
        with self._sync_lock:
            if seq != self._active_seq or self._synced >= target:
                return
            upto = self._written
            try:
                self.run_blocking(os.fsync, fd)
            except OSError as exc:
                if exc.errno == errno.EBADF and seq != self._active_seq:
                    return
                raise SinkUnavailable("spool fsync failed: %s" % exc) from None
            if seq == self._active_seq:
                self._synced = max(self._synced, upto)

    def sync_if_due(self):
        """Periodic fsync for sync_ms > 0 (Forwarder.run_syncer calls it on a timer)."""
        if self._dirty_since is not None and self.clock() - self._dirty_since >= self.sync_ms / 1000.0:
            self._dirty_since = None
            fd = self._fd
            if fd is not None:
                self._sync_to(fd, self._active_seq, self._written)

    def _write_locked(self, buf):
        """Append buf; on failure cut the segment back to its last whole frame, so the
        frames appended after it stay readable (a half frame in the middle would end
        every later read there)."""
        try:
            _write_all(self._fd, buf)
        except OSError:
            try:
                os.ftruncate(self._fd, self._active_size)
            except OSError:
                # Cannot even cut it: stop writing to this segment.  Its half frame is
                # then a torn tail, which readers drop, and the next append starts anew.
                self._retire_active_locked()
            raise

    def _rotate_locked(self):
        """Open a fresh segment, then retire the active one (fsynced).

        The new file is opened and made durable first, so a failure (EMFILE, ENOSPC)
        leaves the spool exactly as it was."""
        seq = self._next_seq
        path = self.path(seq)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            _fsync_dir(self.dir)
            if self._fd is not None:
                os.fsync(self._fd)
        except OSError:
            os.close(fd)
            _unlink_quietly(path)
            raise
        self._next_seq += 1
        self._retire_active_locked(synced=True)
        self._fd, self._active_seq = fd, seq

    def _retire_active_locked(self, synced=False):
        """Close the active segment; it becomes a closed segment for the forwarder."""
        if self._fd is None:
            return
        fd, self._fd, self._active_seq = self._fd, None, None
        try:
            if not synced:
                os.fsync(fd)
        except OSError as exc:
            log.error("spool fsync on close failed: %s", exc)
        finally:
            os.close(fd)
        self.closed_bytes += self._active_size
        self._active_size = self._written = self._synced = 0

    def seal_active(self):
        """Make the active segment forwardable (called when only it holds data)."""
        with self._write_lock:
            if self._fd is not None and self._active_size:
                self._rotate_locked()

    def closed_segments(self):
        return [s for s in self.segments() if s != self._active_seq]

    def forgot(self, seq, size):
        """A closed segment was fully forwarded and deleted."""
        self.closed_bytes = max(0, self.closed_bytes - size)
        self.full = False

    def close(self):
        with self._write_lock:
            self._closed = True
            self._retire_active_locked()
        os.close(self._lock_fd)


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def _lock_directory(directory):
    fd = os.open(os.path.join(directory, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise SystemExit("spool directory %s is in use by another process" % directory)
    return fd
