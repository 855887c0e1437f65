"""`ingest serve`: the eventlet raw-WSGI bootstrap of one worker: the HTTP protocol
seam, socket options, signals, graceful drain, start-up.

Start-up failures an operator can cause (the port taken, a spool or log path that cannot
be written, a bad routes file with no last good copy) end the process with one line on
stderr saying what and where, and exit status 1; never a traceback.  /health answers the
worker's identity (slot, port, pid and a per-start instance id), so a launcher can tell
this worker from any other listener on its port.

One of the two places that touch eventlet (the other is the bundled queue server,
ingest/queue/); monkey patching has already happened in cli.py.  Signal handlers only set flags; the
main green thread acts on them: SIGHUP reloads the routing table off the request path
(in a native thread via tpool), SIGTERM/SIGINT drain: /ready turns 503, the listening
socket closes, in-flight requests get up to `drain_s` to finish, then the process exits 0.
"""
import gc
import logging
import os
import signal
import time

import eventlet
import eventlet.event
import eventlet.tpool
import eventlet.wsgi

from ingest import __version__, errors
from ingest.http import make_app
from ingest.http.access_log import open_access_log
from ingest.http.answers import json_body
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

log = logging.getLogger("ingest.worker")
# How often the supervising green thread looks at the signal flags.
_TICK_S = 0.05


class GreenLatch(eventlet.event.Event):
    """A one-shot event with threading.Event's set()/wait().

    PERF: creating one costs ~0.4 us against ~2.6 us for a monkey-patched threading.Event,
    and BatchingSink makes one per request."""

    def set(self):
        self.send()


# The body of every answer the HTTP parser gives itself (the catalogue's wording).
_ERROR_BODY = json_body({"status": 0, "error": errors.message("malformed_http")})


class IngestProtocol(eventlet.wsgi.HttpProtocol):
    """eventlet's HTTP/1.1 handler with stricter framing and well-formed errors.

    - Errors the standard library's parser raises (bad request line, bad version, too
      many headers) get a fixed JSON body with a real status line, never the request
      echoed back in an HTML page; an unparsable version is answered as HTTP/1.0 (the
      default of HTTP/0.9 wrote no status line at all).
    - A header block the parser could not fully read (a malformed line makes it stop
      early and silently drop the headers after it, including Content-Length) is
      refused: otherwise the rest is read as a second request (request smuggling).
    - Content-Length must be plain digits and appear once; Transfer-Encoding other than
      `chunked` is refused.
    - The header block must arrive within the read timeout as a whole (slow-loris).
    """

    default_request_version = "HTTP/1.0"

    def send_error(self, code, message=None, explain=None):
        if code >= 500:   # 501/505 for a bad method or version: the client's fault, say 400
            code = 400
        phrase = self.responses.get(code, ("Error",))[0]
        # After a HEAD (even one whose request line is broken) send no body, with a
        # Content-Length of 0, which reads the same whichever way the client framed it.
        head_request = self.command == "HEAD" or getattr(self, "raw_requestline", b"")[:5] == b"HEAD "
        body = b"" if head_request else _ERROR_BODY
        head = ("HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                "Connection: close\r\n\r\n" % (code, phrase, len(body)))
        self.close_connection = 1
        try:
            self.wfile.write(head.encode("latin-1") + body)
            self.wfile.flush()
        except OSError:
            pass

    def parse_request(self):
        # The socket timeout is per read: a client sending one header byte every few
        # seconds would never hit it.  The whole header block gets that budget instead.
        budget = self.server.socket_timeout
        deadline = eventlet.Timeout(budget) if budget else None
        try:
            if not super().parse_request():
                return False
        except eventlet.Timeout as expired:
            if expired is not deadline:
                raise
            self.close_connection = 1      # too slow to deserve an answer
            return False
        finally:
            if deadline is not None:
                deadline.cancel()
        headers = self.headers
        if headers.defects:
            self.send_error(400)
            return False
        lengths = headers.get_all("Content-Length") or ()
        if len(lengths) > 1 or (lengths and not lengths[0].strip().isdigit()):
            self.send_error(400)
            return False
        coding = headers.get("Transfer-Encoding")
        if coding is not None and coding.strip().lower() != "chunked":
            self.send_error(400)
            return False
        if self.server.app.state.draining:
            # A request read after SIGTERM, on a kept-alive connection: close without an
            # answer.  Nothing was stored, so nginx sends it to another worker
            # (proxy_next_upstream error ... non_idempotent); a 503 would reach the client
            # as a failure.  Requests already in the app finish and are answered.
            self.close_connection = 1
            return False
        return True


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
    batched = BatchingSink(kestrel, writers=settings.kestrel_writers, event_factory=GreenLatch)
    if not settings.spool:
        return batched, client, None
    spool = Spool(settings.spool, sync_ms=settings.spool_sync_ms,
                  max_bytes=settings.spool_max_mb * 1024 * 1024,
                  run_blocking=eventlet.tpool.execute)
    notices = SpoolNotices(spool)
    forwarder = Forwarder(spool, kestrel.put, retry_s=max(settings.kestrel_retry_ms, 100) / 1000.0,
                          notices=notices)
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
                   access_log=open_log(settings))
    sock = listen(settings)
    flags = watch_signals()
    server = eventlet.spawn(
        eventlet.wsgi.server, sock, app, log=logging.getLogger("ingest.wsgi"),
        protocol=IngestProtocol,
        log_output=False, debug=False, keepalive=settings.keepalive_idle_s or False,
        url_length_limit=settings.max_request_line_bytes, max_size=settings.max_connections,
        socket_timeout=settings.read_timeout_s or None,
        # Our header names are already canonical; skip eventlet re-capitalising each one.
        capitalize_response_headers=False)
    forwarding = eventlet.spawn(forwarder.run) if forwarder is not None else None
    if forwarder is not None and settings.spool_sync_ms > 0:
        eventlet.spawn(forwarder.run_syncer)
    tune_gc()
    log.info("listening on http://%s:%d (slot %s, instance %s)", settings.host, settings.port,
             settings.slot, state.identity["instance"])
    supervise(flags, server, router, app.access_log)
    code = drain(settings, state, server, sock)
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


def supervise(flags, server, router, access_log=None):
    """The main green thread acts on the flags until a stop (or the server died), and
    reopens the access log once a rotation moved it away."""
    reopen_every = int(1.0 / _TICK_S)
    ticks = 0
    while not flags.stop and not server.dead:
        if flags.reload:
            flags.reload = False
            # Parse in a native thread; the swap itself happens back in this green thread.
            eventlet.spawn(router.reload, eventlet.tpool.execute)
        ticks += 1
        if access_log is not None and ticks % reopen_every == 0:
            access_log.reopen_if_moved()
        eventlet.sleep(_TICK_S)


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
