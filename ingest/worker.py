"""`ingest serve`: the eventlet raw-WSGI bootstrap of one worker: the HTTP protocol
seam, socket options, signals, graceful drain.

One of the two places that touch eventlet (the other is the bundled queue server,
ingest/queue/); monkey patching has already happened in cli.py.  Signal handlers only set flags; the
main green thread acts on them: SIGHUP reloads the routing table off the request path
(in a native thread via tpool), SIGTERM/SIGINT drain: /ready turns 503, the listening
socket closes, in-flight requests get up to `drain_s` to finish, then the process exits 0.

Running out of file descriptors is survived: accept() failing with EMFILE/ENFILE (which
eventlet's server would take as the end of its loop) is logged and retried with
back-off while open connections keep being served (PatientListener).  If the server's
loop ends for any other reason than a stop, the process exits 1, never 0.
"""
import errno
import gc
import logging
import resource
import signal
import time

import eventlet
import eventlet.event
import eventlet.tpool
import eventlet.wsgi

from ingest import errors
from ingest.http import make_app
from ingest.http.access_log import open_access_log
from ingest.http.answers import json_body
from ingest.http.app import AppState
from ingest.kestrel.client import Client
from ingest.metrics import Metrics
from ingest.routing import Router, RoutesError
from ingest.sinks.batching import BatchingSink
from ingest.sinks.fallback import SpoolingSink
from ingest.sinks.forwarder import Forwarder
from ingest.sinks.kestrel import KestrelSink
from ingest.sinks.spool import Spool

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
        return True

    def get_environ(self):
        """eventlet's environ, with the whole-body deadline on wsgi.input and the hook
        the app calls to close the connection instead of reading an unread body."""
        env = super().get_environ()
        budget = env.get("ingest.body_timeout_s")
        if budget and ("CONTENT_LENGTH" in env or "HTTP_TRANSFER_ENCODING" in env):
            env["wsgi.input"] = DeadlineInput(env["wsgi.input"], budget, self)
        env["ingest.close"] = self.close_after_answer
        return env

    def close_after_answer(self):
        self.close_connection = 1


class DeadlineInput:
    """wsgi.input with one deadline for the whole body.

    The socket timeout bounds each read only, so a client sending a byte every few
    seconds would hold its request (and its connection) for as long as it likes; here
    the body as a whole must arrive within `seconds` of the headers, else TimeoutError
    (the app answers 408) and the connection is closed."""

    def __init__(self, raw, seconds, protocol):
        self.raw = raw
        self.deadline = time.monotonic() + seconds
        self.protocol = protocol

    def _within(self, method, *args):
        left = self.deadline - time.monotonic()
        expired = TimeoutError("request body not received in time")
        if left <= 0:
            self.protocol.close_after_answer()
            raise expired
        try:
            with eventlet.Timeout(left, expired):
                return method(*args)
        except OSError:
            self.protocol.close_after_answer()   # what is left of the body is unknown
            raise

    def read(self, *args):
        return self._within(self.raw.read, *args)

    def readline(self, *args):
        return self._within(self.raw.readline, *args)

    def __iter__(self):
        return iter(self.read, b"")


# accept() errors that mean "no descriptor (or memory) for a new connection now".
_RESOURCE_ERRNOS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))


class PatientListener:
    """The listening socket, with an accept() that survives running out of descriptors.

    eventlet's server loop re-raises an EMFILE from accept() and ends (the process would
    then exit).  Here the failure is counted, logged (at most every LOG_EVERY_S) and
    retried after a back-off that doubles from MIN_WAIT_S to MAX_WAIT_S; meanwhile the
    connections already open keep being served and may free descriptors.  Everything
    else is the socket's own."""

    MIN_WAIT_S, MAX_WAIT_S, LOG_EVERY_S = 0.01, 1.0, 10.0

    def __init__(self, sock, state):
        self._sock = sock
        self._state = state
        self._logged_at = None

    def accept(self):
        wait = self.MIN_WAIT_S
        while True:
            try:
                return self._sock.accept()
            except OSError as exc:
                if exc.errno not in _RESOURCE_ERRNOS:
                    raise
                self._state.accept_errors += 1
                self._log(exc, wait)
            eventlet.sleep(wait)
            wait = min(wait * 2, self.MAX_WAIT_S)

    def _log(self, exc, wait):
        now = time.monotonic()
        if self._logged_at is None or now - self._logged_at >= self.LOG_EVERY_S:
            self._logged_at = now
            log.error("cannot accept a connection: %s (descriptor limit %d; %d accept"
                      " failures so far); open connections are still served, retrying in"
                      " %.2fs", exc.strerror or exc, resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                      self._state.accept_errors, wait)

    def __getattr__(self, name):
        return getattr(self._sock, name)


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
    batched = BatchingSink(kestrel, writers=settings.kestrel_writers, event_factory=GreenLatch)
    if not settings.spool:
        return batched, client, None
    spool = Spool(settings.spool, sync_ms=settings.spool_sync_ms,
                  max_bytes=settings.spool_max_mb * 1024 * 1024,
                  run_blocking=eventlet.tpool.execute)
    forwarder = Forwarder(spool, kestrel.put, retry_s=max(settings.kestrel_retry_ms, 100) / 1000.0,
                          dead_letter_s=settings.spool_dead_letter_s)
    if spool.segments():
        log.info("spool %s holds %d bytes from an earlier run; forwarding", settings.spool,
                 spool.size_bytes())
    return SpoolingSink(batched, spool), client, forwarder


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
    sock = eventlet.listen((settings.host, settings.port), backlog=2048,
                           reuse_port=settings.reuse_port)
    return sock


def serve(settings):
    log.info("settings: %s", settings.describe())
    # eventlet reads its header-line limit from a module global; the bootstrap owns it.
    eventlet.wsgi.MAX_HEADER_LINE = settings.max_header_bytes
    try:
        router = Router(settings.routes, log=log)
    except RoutesError as exc:
        raise SystemExit("ingest serve: bad routes file: %s" % exc)
    sink, client, forwarder = build_sink(settings)
    state = AppState()
    metrics = Metrics(state=state, router=router, client=client,
                      spool=forwarder.spool if forwarder else None)
    app = make_app(settings, sink, clock=time.time, router=router, state=state, metrics=metrics,
                   access_log=open_access_log(settings.access_log), pause=eventlet.sleep)
    warning = descriptor_warning(settings)
    if warning:
        log.warning(warning)
    sock = PatientListener(listen(settings), state)
    flags = watch_signals()
    server = eventlet.spawn(
        eventlet.wsgi.server, sock, app, log=logging.getLogger("ingest.wsgi"),
        protocol=IngestProtocol, environ={"ingest.body_timeout_s": settings.body_timeout_s},
        log_output=False, debug=False, keepalive=settings.keepalive_idle_s or False,
        url_length_limit=settings.max_request_line_bytes, max_size=settings.max_connections,
        socket_timeout=settings.read_timeout_s or None,
        # Our header names are already canonical; skip eventlet re-capitalising each one.
        capitalize_response_headers=False)
    forwarding = eventlet.spawn(forwarder.run) if forwarder is not None else None
    if forwarder is not None and settings.spool_sync_ms > 0:
        eventlet.spawn(forwarder.run_syncer)
    tune_gc()
    log.info("listening on http://%s:%d", settings.host, settings.port)
    supervise(flags, server, router, MemoryReturner(state))
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


def supervise(flags, server, router, memory=None):
    """The main green thread acts on the flags until a stop (or the server died)."""
    while not flags.stop and not server.dead:
        if flags.reload:
            flags.reload = False
            # Parse in a native thread; the swap itself happens back in this green thread.
            eventlet.spawn(router.reload, eventlet.tpool.execute)
        if memory is not None:
            memory.tick()
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
