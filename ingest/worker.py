"""`ingest serve`: the eventlet raw-WSGI bootstrap of one worker: the HTTP protocol
seam, socket options, signals, graceful drain, start-up.

Start-up failures an operator can cause (the port taken, a spool or log path that cannot
be written, a bad routes file with no last good copy) end the process with one line on
stderr saying what and where, and exit status 1; never a traceback.  /health answers the
worker's identity (slot, port, pid and a per-start instance id), so a launcher can tell
this worker from any other listener on its port.

With ingest/wsgi_server.py (the HTTP seam: strict framing, body deadline, accept that
survives EMFILE) one of the places that touch eventlet (the other is the bundled queue
server, ingest/queue/); monkey patching has already happened in cli.py.  Signal handlers only set flags; the
main green thread acts on them: SIGHUP reloads the routing table off the request path
(in a native thread via tpool), SIGTERM/SIGINT drain: /ready turns 503, the listening
socket closes, in-flight requests get up to `drain_s` to finish, then the process exits 0.

Running out of file descriptors is survived: accept() failing with EMFILE/ENFILE (which
eventlet's server would take as the end of its loop) is logged and retried with
back-off while open connections keep being served (wsgi_server.PatientListener).  If the server's
loop ends for any other reason than a stop, the process exits 1, never 0.
"""
import gc
import logging
import os
import resource
import signal
import time

import eventlet
import eventlet.event
import eventlet.tpool
import eventlet.wsgi

from ingest import __version__
from ingest.http import make_app
from ingest.http.access_log import open_access_log
from ingest.http.app import AppState
from ingest.kestrel.client import Client
from ingest.metrics import Metrics
from ingest.routing import Router, RoutesError
from ingest.routing.last_good import LastGoodRoutes
from ingest.sinks.batching import BatchingSink
from ingest.sinks.fallback import SpoolingSink
from ingest.sinks.forwarder import Forwarder
from ingest.sinks.kestrel import KestrelSink
from ingest.sinks.spool import Spool
from ingest.sinks.spool_log import SpoolNotices
from ingest.green import GreenLatch, os_lock
from ingest.wsgi_server import IngestProtocol, PatientListener

log = logging.getLogger("ingest.worker")
# How often the supervising green thread looks at the signal flags.
_TICK_S = 0.05


# Descriptors a worker needs besides its client connections: the listening socket, the
# spool, logs, eventlet's hub and tpool pipes, DNS, a margin.
_BASE_FDS = 64


def descriptor_warning(settings, limits=None):
    """A warning when --max-connections (plus the Kestrel pool and a base) does not fit
    the soft RLIMIT_NOFILE; None when it does."""
    soft, hard = limits or resource.getrlimit(resource.RLIMIT_NOFILE)
    need = settings.max_connections + settings.kestrel_pool_size * len(settings.kestrel) + \
        _BASE_FDS
    if soft == resource.RLIM_INFINITY or soft >= need:
        return None
    return ("--max-connections %d needs about %d file descriptors (with %d per Kestrel server"
            " and %d for the worker itself), but the limit is %d (hard %s): new connections"
            " will wait while accept() fails with 'Too many open files'.  Raise the limit"
            " (ulimit -n, supervisord's minfds) or lower --max-connections."
            % (settings.max_connections, need, settings.kestrel_pool_size, _BASE_FDS, soft,
               "unlimited" if hard == resource.RLIM_INFINITY else hard))


class Flags:
    def __init__(self):
        self.stop = False
        self.reload = False


def build_sink(settings):
    """Kestrel, batched, wrapped by the spool when one is configured.

    Returns (sink, client, forwarder or None)."""
    client = Client(list(settings.kestrel),
                    connect_timeout_ms=settings.kestrel_connect_timeout_ms,
                    timeout_ms=settings.kestrel_timeout_ms,
                    retry_ms=settings.kestrel_retry_ms,
                    pool_size=settings.kestrel_pool_size)
    kestrel = KestrelSink(client)
    batched = BatchingSink(kestrel, writers=settings.kestrel_writers, event_factory=GreenLatch,
                           lock=os_lock())
    if not settings.spool:
        return batched, client, None
    spool = Spool(settings.spool, sync_ms=settings.spool_sync_ms,
                  max_bytes=settings.spool_max_mb * 1024 * 1024,
                  run_blocking=eventlet.tpool.execute)
    notices = SpoolNotices(spool)
    forwarder = Forwarder(spool, kestrel.put, retry_s=max(settings.kestrel_retry_ms, 100) / 1000.0,
                          dead_letter_s=settings.spool_dead_letter_s, notices=notices)
    if spool.segments():
        log.warning("spool %s holds %d bytes from an earlier run; forwarding", settings.spool,
                    spool.size_bytes())
    return SpoolingSink(batched, spool, notices), client, forwarder


def tune_gc():
    """Keep the cyclic garbage collector off the latency tail.

    Requests allocate many short-lived, acyclic objects (parsed JSON), so the default
    thresholds run a collection every 700 allocations and, every so often, a full one over
    the whole heap.  Everything alive at start-up is moved out of the collector's sight
    (gc.freeze) and young collections run less often.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50000, 20, 20)


def listen(settings):
    try:
        return eventlet.listen((settings.host, settings.port), backlog=2048,
                               reuse_port=settings.reuse_port)
    except OSError as exc:
        raise SystemExit("ingest serve: cannot listen on %s:%d: %s"
                         % (settings.host, settings.port, exc.strerror or exc)) from None


def open_spool_sink(settings):
    """build_sink, with a spool directory that cannot be created, locked or written
    ending the program in one line."""
    if settings.spool:
        try:
            os.makedirs(settings.spool, exist_ok=True)
            probe = os.path.join(settings.spool, ".write-probe-%d" % os.getpid())
            with open(probe, "wb") as fh:
                fh.write(b"ok")
            os.unlink(probe)
        except OSError as exc:
            raise SystemExit("ingest serve: spool directory %s is not writable: %s"
                             % (settings.spool, exc.strerror or exc)) from None
    try:
        return build_sink(settings)
    except OSError as exc:
        raise SystemExit("ingest serve: spool directory %s: %s"
                         % (settings.spool, exc.strerror or exc)) from None


def load_routes(settings):
    """The Router; with a spool, the last good routes file is kept beside it and used
    when the routes file is refused at start.  Without a usable table: one line, exit."""
    keeper = LastGoodRoutes(settings.spool) if settings.spool and settings.routes else None
    loader = keeper.load if keeper is not None else None
    try:
        return Router(settings.routes, log=log, loader=loader)
    except RoutesError as exc:
        if keeper is None:
            raise SystemExit("ingest serve: bad routes file: %s" % exc) from None
        try:
            table, reason = keeper.fallback(exc)
        except RoutesError as no_fallback:
            raise SystemExit("ingest serve: bad routes file: %s" % no_fallback) from None
    router = Router(settings.routes, log=log, loader=loader, table=table)
    router.stale = reason
    log.error("routes: %s; fix the file, check it with `ingest routes check %s`, then"
              " SIGHUP", reason, settings.routes)
    return router


def open_log(settings):
    try:
        return open_access_log(settings.access_log)
    except OSError as exc:
        raise SystemExit("ingest serve: cannot open access log %s: %s"
                         % (settings.access_log, exc.strerror or exc)) from None


def identity(settings):
    """What /health answers: which worker this is, and a per-start instance id."""
    return {"status": "ok", "service": "ingest", "version": __version__,
            "slot": settings.slot, "port": settings.port, "pid": os.getpid(),
            "instance": os.urandom(8).hex()}


def serve(settings):
    """Run one worker until SIGTERM; under cProfile when profile_file is set."""
    if not settings.profile_file:
        return _serve(settings)
    import cProfile
    profiler = cProfile.Profile()
    try:
        return profiler.runcall(_serve, settings)
    finally:
        profiler.dump_stats(settings.profile_file)
        log.info("profile written to %s", settings.profile_file)


def server_options(settings):
    """eventlet's HTTP server options for a worker with `settings` (bench.instructions
    --seam builds its server with them too)."""
    return dict(
        log=logging.getLogger("ingest.wsgi"), protocol=IngestProtocol,
        environ={"ingest.body_timeout_s": settings.body_timeout_s}, log_output=False,
        debug=False, keepalive=settings.keepalive_idle_s or False,
        url_length_limit=settings.max_request_line_bytes,
        socket_timeout=settings.read_timeout_s or None,
        # Our header names are already canonical; skip eventlet re-capitalising each one.
        capitalize_response_headers=False)


def _serve(settings):
    log.info("settings: %s", settings.describe())
    # eventlet reads its header-line limit from a module global; the bootstrap owns it.
    eventlet.wsgi.MAX_HEADER_LINE = settings.max_header_bytes
    sink, client, forwarder = open_spool_sink(settings)
    router = load_routes(settings)
    state = AppState()
    state.identity = identity(settings)
    metrics = Metrics(state=state, router=router, client=client,
                      spool=forwarder.spool if forwarder else None)
    app = make_app(settings, sink, clock=time.time, router=router, state=state, metrics=metrics,
                   access_log=open_log(settings), pause=eventlet.sleep)
    warning = descriptor_warning(settings)
    if warning:
        log.warning(warning)
    sock = PatientListener(listen(settings), state)
    flags = watch_signals()
    server = eventlet.spawn(eventlet.wsgi.server, sock, app,
                            max_size=settings.max_connections, **server_options(settings))
    forwarding = eventlet.spawn(forwarder.run) if forwarder is not None else None
    if forwarder is not None and settings.spool_sync_ms > 0:
        eventlet.spawn(forwarder.run_syncer)
    tune_gc()
    log.info("listening on http://%s:%d (slot %s, instance %s)", settings.host, settings.port,
             settings.slot, state.identity["instance"])
    supervise(flags, server, router, app.access_log, MemoryReturner(state))
    died = server.dead and not flags.stop
    code = drain(settings, state, server, sock)
    if died:
        log.error("the HTTP server stopped on its own (see the error above); exiting 1")
        code = 1
    if forwarder is not None:
        forwarder.stopping = True
        _wait_for(forwarding, settings.drain_s)   # not mid-segment when the spool closes
        forwarder.spool.close()
        log.info("spool closed (%d records forwarded this run)", forwarder.forwarded)
    eventlet.tpool.killall()
    return code


def watch_signals():
    """Signal handlers that only set flags (SIGTERM/SIGINT: stop, SIGHUP: reload)."""
    flags = Flags()

    def on_stop(signum, _frame):
        flags.stop = True

    def on_hup(signum, _frame):
        flags.reload = True

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    return flags


def supervise(flags, server, router, access_log=None, memory=None):
    """The main green thread acts on the flags until a stop (or the server died), and
    reopens the access log once a rotation moved it away."""
    reopen_every = int(1.0 / _TICK_S)
    ticks = 0
    while not flags.stop and not server.dead:
        if flags.reload:
            flags.reload = False
            # Parse in a native thread; the swap itself happens back in this green thread.
            eventlet.spawn(router.reload, eventlet.tpool.execute)
        if memory is not None:
            memory.tick()
        ticks += 1
        if access_log is not None and ticks % reopen_every == 0:
            access_log.reopen_if_moved()
        eventlet.sleep(_TICK_S)


class MemoryReturner:
    """Gives freed memory back to the system once the worker is idle after big bodies.

    PERF: after a burst of 80 gzip requests inflating to 4-8 MB each, RSS stayed at
    141-146 MB (39 MB at start) once every answer was sent: glibc keeps freed heap
    pages.  malloc_trim(0) when nothing is in flight and TRIM_AFTER_BYTES of bodies
    were handled since the last trim brought it to 56-60 MB within a second
    (docs/benchmarks.md, "Memory under gzip bodies"); it never runs while requests are
    being served."""

    TRIM_AFTER_BYTES = 16 * 1024 * 1024

    def __init__(self, state):
        self.state = state
        self.trimmed_at = 0
        try:
            import ctypes
            self.trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):      # not glibc: nothing to do
            self.trim = None

    def tick(self):
        state = self.state
        if self.trim is not None and not state.in_flight and \
                state.body_bytes_done - self.trimmed_at >= self.TRIM_AFTER_BYTES:
            self.trimmed_at = state.body_bytes_done
            self.trim(0)


def drain(settings, state, server, sock):
    """Stop accepting, let in-flight requests finish within the budget, exit 0."""
    state.draining = True
    log.info("draining: %d requests in flight, budget %.1fs", state.in_flight, settings.drain_s)
    if not server.dead:
        server.kill(SystemExit)       # ends the accept loop; idle connections are shut
    try:
        sock.close()
    except OSError:
        pass
    deadline = time.monotonic() + settings.drain_s
    while state.in_flight and time.monotonic() < deadline:
        eventlet.sleep(_TICK_S)
    # in_flight drops before eventlet writes the answer: wait for the server's own
    # cleanup (every connection's handler finished) within what is left of the budget.
    _wait_for(server, deadline - time.monotonic())
    if state.in_flight or not server.dead:
        log.warning("drain budget spent with %d requests unanswered (not acknowledged)",
                    state.in_flight)
    else:
        log.info("drained; exiting")
    return 0


def _wait_for(greenthread, seconds):
    """Wait for a green thread to end, at most `seconds`; True when it did."""
    if greenthread is None or greenthread.dead:
        return True
    try:
        with eventlet.Timeout(max(seconds, 0.01)):
            greenthread.wait()
    except eventlet.Timeout:
        return False
    except (Exception, SystemExit):  # its own failure was logged where it happened
        pass
    return True
