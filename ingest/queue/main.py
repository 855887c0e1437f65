"""`ingest queue` as a process: lock, load the journals, listen, accept, stop on a signal.

What it is for: `main(settings)` (QueueSettings from ingest/config.py: `host, port,
data, sync_ms, config, max_item_bytes, max_queues`) reads the --config file, takes the
data directory (an exclusive flock on `<data>/.lock`) and the port (bound without
SO_REUSEPORT, so a second server cannot share it), loads every queue from the data
directory, listens, serves until SIGTERM/SIGINT or a client's `shutdown`, then writes
and fsyncs every journal.  Exit codes: 0 after a clean stop, 1 when the address cannot
be bound or another server holds the data directory (one log line naming it), 2 for bad
settings or a bad --config file; journal.EXIT_IO_ERROR (75) comes from a failed journal
write, read or fsync, anywhere, and from a journal that cannot be loaded.

What it must not do: do any work in a signal handler (it only writes to a pipe), touch
the data directory before it holds the lock, or accept connections before the
journals are replayed.
"""
import ctypes
import errno
import fcntl
import logging
import os
import posix
import signal
import socket

import eventlet
from eventlet import hubs

from ingest.queue import journal as jr
from ingest.queue.connection import Connection
from ingest.queue.options import DEFAULT_MAX_ITEM_BYTES, load_config
from ingest.queue.server import VERSION, QueueServer

log = logging.getLogger("ingest.queue")

LOCK_NAME = ".lock"     # not a valid queue name ('.'), so never taken for a journal
M_MMAP_THRESHOLD = -3   # glibc mallopt parameter
MMAP_THRESHOLD_BYTES = 512 * 1024


class CannotStart(Exception):
    """The port or the data directory is taken: one line, exit 1."""


def _accept_loop(server, listener):
    while True:
        try:
            sock, _addr = listener.accept()
        except OSError:
            if server.stop_event.ready():
                return
            log.exception("accept failed")
            eventlet.sleep(0.1)   # e.g. EMFILE: back off instead of spinning
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        eventlet.spawn_n(Connection(server, sock).run)


def _install_signal_handlers(server):
    """Signal handlers only write to a pipe; a green thread turns that into a stop."""
    r, w = os.pipe()
    os.set_blocking(w, False)

    def handler(signum, _frame):
        # posix.write: the green os.write would try to switch inside the hub.
        try:
            posix.write(w, b"x")
        except OSError:
            pass

    def watch():
        hubs.trampoline(r, read=True)
        log.info("signal received, stopping")
        server.request_stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    eventlet.spawn_n(watch)


def main(settings):
    """Run the server with QueueSettings (ingest/config.py; already validated there)."""
    max_item = settings.max_item_bytes if settings.max_item_bytes is not None \
        else DEFAULT_MAX_ITEM_BYTES
    try:
        config = load_config(settings.config, max_item)
    except (OSError, ValueError) as exc:
        log.error("bad --config %s: %s", settings.config, exc)
        return 2
    data_dir = os.path.abspath(settings.data)
    _fixed_mmap_threshold()
    try:
        lock = lock_data_dir(data_dir)
        sock = bind(settings.host, settings.port)
    except CannotStart as exc:
        log.error("cannot start: %s", exc)
        return 1
    server = QueueServer(data_dir, config, settings.sync_ms, settings.config, max_item,
                         settings.max_queues)
    _install_signal_handlers(server)     # a signal during a long replay stops after it
    try:
        server.load()
        sock.listen(1024)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            log.error("cannot start: %s:%d is in use", settings.host, settings.port)
            return 1
        log.critical("cannot load the journals in %s: %s", data_dir, exc)
        return jr.EXIT_IO_ERROR
    try:
        return _serve(server, sock, settings)
    finally:
        os.close(lock)


def _fixed_mmap_threshold():
    """PERF (memory): glibc raises its mmap threshold to the size of each big block freed
    (the replay's 4 MiB reads, read-back pieces), after which those blocks come from the
    heap and leave holes among the items that stay: filling and draining a 40 MiB
    backlog with a 2 MiB bound grew RSS by 10.9 MiB (46 MiB after a restart); with the
    threshold fixed at 512 KiB, by 3.1 MiB (40 MiB).  Receive buffers (256 KiB) stay
    below it, so sets are not slowed.  Not glibc: nothing to do."""
    try:
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError):
        pass


def lock_data_dir(path):
    """An exclusive flock on `<path>/.lock`, held until the process ends (its fd)."""
    try:
        os.makedirs(path, exist_ok=True)
        fd = os.open(os.path.join(path, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                     0o644)
    except OSError as exc:
        raise CannotStart("data directory %s: %s" % (path, exc.strerror or exc)) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
        os.close(fd)
        raise CannotStart("data directory %s is in use by another ingest queue (pid %s)"
                          % (path, holder)) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, b"%d\n" % os.getpid(), 0)
    return fd


def bind(host, port):
    """A TCP socket bound to host:port with SO_REUSEADDR but not SO_REUSEPORT (which
    eventlet.listen sets, letting a second server share the port silently)."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, 0,
                                                          socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as exc:
        raise CannotStart("cannot listen on %s:%d: %s" % (host, port, exc.strerror or exc)) \
            from None
    return sock


def _serve(server, listener, settings):
    """Accept until asked to stop; then let in-flight replies out and sync everything."""
    server.start()
    eventlet.spawn_n(_accept_loop, server, listener)
    log.info("ingest queue %s listening on %s:%d (data %s, sync-ms %d)", VERSION,
             settings.host, listener.getsockname()[1], server.data_dir, settings.sync_ms)
    server.stop_event.wait()
    listener.close()
    eventlet.sleep(0.05)   # grace period, like Kestrel's: in-flight replies go out first
    server.write_pending()
    server.syncer.sync_all_now()
    log.info("journals synced, exiting")
    return 0
