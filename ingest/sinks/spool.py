"""The local disk spool: where records go when no Kestrel server takes them.

Acknowledgement rule (docs/durability.md): a request is answered as accepted only once
every record is STORED by Kestrel or appended here under the fsync policy.  So
`Spool.append(pairs)` writes one frame per (queue, payload) to the active segment with
os.write (a process crash after it returns loses nothing), then fsyncs per `sync_ms`
(0 = before returning, group-committed: concurrent appenders share one fsync).  The frame
format (ingest/sinks/frames.py) tells a crash's torn tail from damage.  One process owns
a spool directory at a time (an flock on DIR/lock).  Reading it back is
ingest/sinks/forwarder.py's job.

Segment numbers never repeat, across restarts too: the last number handed out is kept
in DIR/sequence (written to a temporary file, fsynced and renamed before the segment is
created), and a new spool also starts above every spool-N name already in the directory.
Each segment's header carries its number and 16 random bytes, which the forwarder's
progress file must name (forwarder.py).

What it must not do: acknowledge a record whose write or fsync failed, or leave a half
frame in the middle of a segment (a failed write is cut back to the last whole frame).
A failed write is remembered (`write_error`) so /ready can say the spool cannot take
records; `check_writable()` probes the disk again at most once a second.

This module uses `threading` primitives only; under eventlet's monkey patching they are
green.  The blocking fsync is run through `run_blocking` (the worker passes
eventlet.tpool.execute) so other green threads keep serving meanwhile.
"""
import errno
import fcntl
import logging
import os
import re
import threading
import time

from ingest.fileio import fsync_dir as _fsync_dir
from ingest.fileio import write_all as _write_all
from ingest.sinks import SinkUnavailable
from ingest.sinks.frames import encode_frame, segment_header

log = logging.getLogger("ingest.spool")

SEGMENT_RE = re.compile(r"^spool-(\d{16})\.seg$")
ANY_NAME_RE = re.compile(r"^spool-(\d{16})\.")      # segments and their .pos/.damaged/.dead
DEFAULT_SEGMENT_BYTES = 16 * 1024 * 1024
SEQUENCE_FILE = "sequence"
PROBE_INTERVAL_S = 1.0


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
        self._last_seq = self._highest_seq_on_disk()
        if existing:
            self.has_data.set()
        self.appended_records = 0
        self.full = False          # set when an append was refused, until space frees up
        self.write_error = None    # why the last append failed, until one succeeds
        self.write_errors = 0
        self._probed_at = None
        # Counted by the forwarder (ingest/sinks/forwarder.py), shown at /metrics.
        self.damaged_records = self.damaged_bytes = self.dead_letters = 0

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

    def _highest_seq_on_disk(self):
        """The highest number ever handed out here: DIR/sequence, or any spool-N file."""
        highest = 0
        for name in os.listdir(self.dir):
            m = ANY_NAME_RE.match(name)
            if m:
                highest = max(highest, int(m.group(1)))
        try:
            with open(os.path.join(self.dir, SEQUENCE_FILE), "rb") as fh:
                highest = max(highest, int(fh.read().strip() or 0))
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            log.warning("%s/%s unreadable (%s); numbering from the files present",
                        self.dir, SEQUENCE_FILE, exc)
        return highest

    def _take_seq(self):
        """The next segment number, made durable before any file bears it."""
        seq = self._last_seq + 1
        path = os.path.join(self.dir, SEQUENCE_FILE)
        fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, b"%d\n" % seq)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(path + ".tmp", path)
        self._last_seq = seq
        return seq

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
                if not self._active_size:          # the header goes with the first frames
                    buf = segment_header(self._active_seq, self._active_id) + buf
                self._write_locked(buf)
            except OSError as exc:   # disk full, EMFILE, I/O error: not acknowledged
                raise self._failed("spool write failed", exc) from None
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
        self.write_error = None

    def _failed(self, what, exc):
        """Remember a failed write (for /ready) and the SinkUnavailable to raise."""
        self.write_error = "%s: %s" % (what, exc)
        self.write_errors += 1
        self._probed_at = self.clock()
        log.error("%s: %s", what, exc)
        return SinkUnavailable(self.write_error, retry_after_s=5)

    def check_writable(self):
        """None when the last append worked; else why not.  While failing, the disk is
        probed (a small file written, fsynced, removed) at most once a second, so the
        spool is seen to work again without a request having to risk it."""
        if self.write_error is None:
            return None
        now = self.clock()
        if self._probed_at is not None and now - self._probed_at < PROBE_INTERVAL_S:
            return self.write_error
        self._probed_at = now
        try:
            self.run_blocking(_probe, self.dir)
        except OSError as exc:
            self.write_error = "spool write failed: %s" % exc
            return self.write_error
        self.write_error = None
        return None

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
                raise self._failed("spool fsync failed", exc) from None
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
        frames appended after it stay readable."""
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

        The new file is numbered and made durable first, so a failure (EMFILE, ENOSPC)
        leaves the spool exactly as it was (a number may be skipped, never reused)."""
        seq = self._take_seq()
        path = self.path(seq)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        try:
            _fsync_dir(self.dir)
            if self._fd is not None:
                os.fsync(self._fd)
        except OSError:
            os.close(fd)
            _unlink_quietly(path)
            raise
        self._retire_active_locked(synced=True)
        self._fd, self._active_seq, self._active_id = fd, seq, os.urandom(16)

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

    def active_bytes(self):
        return self._active_size

    def forgot(self, seq, size):
        """A closed segment was fully forwarded and deleted."""
        self.closed_bytes = max(0, self.closed_bytes - size)
        self.full = False

    def close(self):
        with self._write_lock:
            self._closed = True
            self._retire_active_locked()
        os.close(self._lock_fd)


def _probe(directory):
    path = os.path.join(directory, ".probe")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, b"\0" * 4096)
        os.fsync(fd)
    finally:
        os.close(fd)
        _unlink_quietly(path)


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
