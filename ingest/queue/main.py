"""`ingest queue` as a process: load the journals, listen, accept, stop on a signal.

What it is for: `main(settings)` (QueueSettings from ingest/config.py: `host, port,
data, sync_ms, config, max_item_bytes`) reads the --config file, loads every queue from the data
directory, serves until SIGTERM/SIGINT or a client's `shutdown`, then writes and fsyncs
every journal.  Exit codes: 0 after a clean stop, 1 when the address cannot be bound, 2
for bad settings or a bad --config file (journal.EXIT_IO_ERROR, 75, comes from a failed
journal write or fsync, anywhere).

What it must not do: do any work in a signal handler (it only writes to a pipe), or
accept connections before the journals are replayed.
"""
import logging
import os
import posix
import signal
import socket

import eventlet
from eventlet import hubs

from ingest.queue.connection import Connection
from ingest.queue.options import DEFAULT_MAX_ITEM_BYTES, load_config
from ingest.queue.server import VERSION, QueueServer

log = logging.getLogger("ingest.queue")


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
    server = QueueServer(os.path.abspath(settings.data), config, settings.sync_ms,
                         settings.config)
    _install_signal_handlers(server)     # a signal during a long replay stops after it
    server.load()
    try:
        listener = eventlet.listen((settings.host, settings.port), backlog=1024)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", settings.host, settings.port, exc)
        return 1
    return _serve(server, listener, settings)


def _serve(server, listener, settings):
    """Accept until asked to stop; then let in-flight replies out and sync everything."""
    server.syncer.start()
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
