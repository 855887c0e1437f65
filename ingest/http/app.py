"""The WSGI application: one request through decode -> clean -> route -> enqueue -> respond.

What it is for: `App.__call__` is the WSGI callable.  It admits a request (header count,
path, method, in-flight limits), reads it (ingest/http/request.py), decodes the data
(ingest/decode.py), cleans each record (ingest/clean.py), routes it (ingest/routing),
encodes it (ingest/encode.py) and hands the batch to the sink, whose put() returns only
once every record is STORED or spooled; then it answers (ingest/http/answers.py).

What it must not do: touch eventlet or sockets (any WSGI server can host it; unit tests
drive it with an in-memory sink and a fixed clock), create anything at import time, or
answer an error any other way than through answers.error().
"""
import logging
import operator
import time

from ingest import clean as cleaning
from ingest import decode
from ingest.encode import FAST_ENCODE, encode_record
from ingest.errors import IngestError, RecordRejected
from ingest.http import admin, answers, request
from ingest.http.access_log import access_line
from ingest.routing import BLOCKED
from ingest.sinks import SinkUnavailable

log = logging.getLogger("ingest.app")


class AppState:
    """Mutable per-process state the server shares with the app (single event loop)."""

    def __init__(self):
        self.draining = False
        self.in_flight = 0
        self.body_bytes = 0        # bodies of the requests in flight, as held (decompressed)
        self.body_bytes_done = 0   # bodies of the requests answered, all together
        self.accept_errors = 0     # accept() failures the server survived (EMFILE...)
        self.identity = None       # what /health answers (set by the worker at start)


class Charge:
    """One request's share of the in-flight body budget, taken as its body arrives.

    A piece is refused (503) when the bodies held together would pass the budget, unless
    this request holds everything held (a request alone is always served: its own size
    is capped by max_body_bytes and max_decompressed_bytes)."""

    __slots__ = ("state", "budget", "held")

    def __init__(self, state, budget):
        self.state = state
        self.budget = budget
        self.held = 0

    def __call__(self, n):
        state = self.state
        state.body_bytes += n
        self.held += n
        if state.body_bytes > self.budget and state.body_bytes != self.held:
            raise IngestError("overloaded")

    def release(self):
        self.state.body_bytes -= self.held
        self.state.body_bytes_done += self.held
        self.held = 0


def _no_count(*_args):
    pass


def _nothing():
    pass


# A big request lets the others run (pause()) before decoding and every this many
# records.  PERF: 2,000 records of 250 properties (8 MB of JSON) took 89 ms to decode,
# 32 ms to clean and 94 ms to encode on the 2-core VM: without pauses, ~200 ms in which
# no other request is served; with them, the longest stretch is the one decode call.
PAUSE_EVERY_RECORDS = 250
_FIRST = operator.itemgetter(0)


# PERF: route_batch's helpers, so that its locals are not closure cells (which cost
# every call about 800 instructions).
def _kept(records, rejected):
    """The records not `rejected` (index, exception pairs), and their indices."""
    skipped = {i for i, _ in rejected}
    index = [i for i in range(len(records)) if i not in skipped]
    return [records[i] for i in index], index


def _merged(rejected, refused, index):
    """`rejected` and `refused` (indexed in the records kept: `index`, or None when all
    were) as one list, by index in the request."""
    if index is not None:
        refused = [(index[j], exc) for j, exc in refused]
    return sorted(rejected + refused, key=_FIRST)


class App:
    """Build with make_app(); `state` and `router` are shared with the worker bootstrap."""

    def __init__(self, settings, sink, clock=time.time, router=None, state=None, metrics=None,
                 access_log=None, timer=time.perf_counter, pause=None):
        if router is None:
            from ingest.routing import Router
            router = Router(settings.routes)
        self.settings = settings
        self.sink = sink
        self.clock = clock
        self.timer = timer
        self.router = router
        self.state = state or AppState()
        self.metrics = metrics
        self.access_log = access_log
        self.client_ip = request.ClientIP(settings.trusted_proxies)
        self.cleaners = {name: cleaning.cleaner(name) for name in request.ENDPOINTS}
        self.count = metrics.count if metrics is not None else _no_count
        self.observed = metrics is not None or access_log is not None
        # Lets other requests run during a long one (the worker passes eventlet.sleep).
        self.pause = pause or _nothing

    def __call__(self, environ, start_response):
        if not self.observed:
            return self.dispatch(environ, start_response)
        started = self.timer()
        body = self.dispatch(environ, start_response)
        elapsed = self.timer() - started
        status = environ.get("ingest.status", 0)
        if self.metrics is not None:
            self.metrics.request(environ.get("ingest.endpoint") or "other", status, elapsed)
        if self.access_log is not None:
            self.access_log(access_line(environ, status, elapsed, self.clock, self.client_ip))
        return body

    # -- admission ---------------------------------------------------------------------

    def dispatch(self, environ, start_response):
        path = environ.get("PATH_INFO") or "/"
        endpoint = environ["ingest.endpoint"] = request.endpoint_of(path)
        method = environ.get("REQUEST_METHOD", "GET")
        try:
            if request.too_many_headers(environ, self.settings.max_headers):
                raise IngestError("too_many_headers", limit=self.settings.max_headers)
            if endpoint is None:
                return admin.operator_path(self, environ, start_response, path, method)
            if method == "OPTIONS":
                return answers.preflight(environ, start_response)
            if method not in ("GET", "POST"):
                raise IngestError("method_not_allowed")
            self.admit(environ)
        except IngestError as exc:
            if endpoint is not None:
                self.count("request_error", endpoint, exc.reason)
            return answers.error(environ, start_response, exc)
        state = self.state
        state.in_flight += 1
        charge = Charge(state, self.settings.max_body_bytes_in_flight)
        try:
            return self.handle(environ, start_response, endpoint, charge)
        except Exception:
            log.exception("unhandled error on %s", endpoint)
            return answers.error(environ, start_response, IngestError("internal"))
        finally:
            state.in_flight -= 1
            charge.release()

    def admit(self, environ):
        """Refuse (503 + Retry-After) when the worker is draining or full.

        Bodies are read whole, so what all requests in flight hold together is capped.
        Nothing is reserved here: each piece of a body is charged as it arrives (Charge),
        so a client that declares a large body and sends it slowly holds nothing it has
        not sent.  A declared body that would not fit beside what is held now is refused
        before it is read."""
        state, settings = self.state, self.settings
        if state.draining:
            # A request read now arrived on a connection the server is shutting, so its
            # answer may never be delivered; storing it would only make a duplicate of
            # the client's retry.  Requests already in flight finish normally.
            raise IngestError("draining")
        declared = min(request.content_length(environ), settings.max_body_bytes)
        if state.in_flight >= settings.max_in_flight or (
                state.body_bytes and
                state.body_bytes + declared > settings.max_body_bytes_in_flight):
            raise IngestError("overloaded")

    # -- the pipeline ------------------------------------------------------------------

    def handle(self, environ, start_response, endpoint, charge):
        answer = None
        try:
            params = self.read(environ, charge)
            answer = answers.Answer(params, endpoint)
            accepted, rejected, insert_ids = self.process(environ, endpoint, params)
        except IngestError as exc:
            if answer is None:
                answer = answers.query_answer(environ, endpoint)
            if exc.status >= 400:
                log.warning("%s %s: %s", endpoint, exc.status, exc.reason)
            self.count("request_error", endpoint, exc.reason)
            return answers.error(environ, start_response, exc, answer)
        except SinkUnavailable as exc:
            log.warning("%s 503: %s", endpoint, exc)
            self.count("request_error", endpoint, "unavailable")
            return answers.error(environ, start_response,
                                 IngestError("unavailable", retry_after_s=exc.retry_after_s))
        status, out, ctype = answers.processed(answer, accepted, rejected, insert_ids)
        return answers.finish(environ, start_response, answer, status, out, ctype)

    def read(self, environ, charge):
        """The request's parameters, its body read (charged as it arrives) and parsed.

        A request refused before its body was read whole asks the server to close the
        connection (`ingest.close`, set by the worker), instead of reading the rest."""
        s = self.settings
        try:
            body = request.read_body(environ, s.max_body_bytes, s.max_decompressed_bytes,
                                     charge)
        except IngestError:
            environ.get("ingest.close", _nothing)()
            raise
        return decode.read_params(environ.get("QUERY_STRING", ""),
                                  environ.get("CONTENT_TYPE", ""), body)

    def process(self, environ, endpoint, params):
        """Decode, clean, route and store; returns (accepted, rejected list, the
        $insert_id of each rejected record by index)."""
        table = self.router.table
        secret = request.proven_secret(environ, params, table) if endpoint == "import" else None
        # The data text is dropped once decoded: a big request holds its records only.
        data = params.pop("data", None)
        data_chars = len(data) if data else 0
        if data_chars > PAUSE_EVERY_RECORDS * 1000:
            self.pause()
        records, plain, brackets = decode.decode_records(data)
        del data
        limit = self.settings.max_records
        if len(records) > limit:
            raise IngestError("too_many_records", count=len(records), limit=limit)
        now = self.clock()
        ip = self.client_ip(environ) if params.get("ip") in request.TRUE else None
        s = self.settings
        nesting = decode.nesting_bound(records, brackets) if endpoint == "track" else None
        ctx = cleaning.Context(now, ip, s.max_properties, s.max_depth, s.max_string_chars,
                               data_chars, nesting)
        pairs, rejected, accepted = self.route_all(endpoint, records, ctx, table, secret, now,
                                                   plain)
        environ["ingest.accepted"] = accepted
        environ["ingest.rejected"] = len(rejected)
        # The decoded records are dropped before waiting on the sink: a request waiting
        # for Kestrel holds its encoded items only (a 50-event batch: ~25 KB, against
        # ~100 KB more of dicts), which is what 1,000 concurrent requests add up to.
        insert_ids = {i: answers.insert_id_of(records[i]) for i, _ in rejected}
        del records
        if pairs:
            self.sink.put(pairs)
            if self.metrics is not None:
                self.metrics.accepted_pairs(endpoint, pairs)
        return accepted, rejected, insert_ids

    def route_all(self, endpoint, records, ctx, table, secret, now, plain=False, batch=True):
        """Clean, check, route and encode each record: (queue, payload) pairs, the
        rejected (index, RecordRejected) list and how many were accepted (a blocked
        token's records count as accepted but are not queued).  `plain`: the records
        came from decode's fast path (see encode.encode_record).

        A batch (2 to PAUSE_EVERY_RECORDS records, a table that refuses no token, no
        /import secret to check) goes to route_batch, whose outcome is this loop's,
        record for record (tests/unit/test_batch_routing.py compares them: `batch`
        False takes this loop whatever the request)."""
        if (batch and 1 < len(records) <= PAUSE_EVERY_RECORDS and not table.strict_tokens
                and secret is None):
            return self.route_batch(endpoint, records, ctx, table, now, plain)
        clean = self.cleaners[endpoint]
        max_record_bytes = self.settings.max_record_bytes
        route = table.route
        pairs, rejected, accepted = [], [], 0
        append = pairs.append
        pause = self.pause if len(records) > PAUSE_EVERY_RECORDS else None
        for i, record in enumerate(records):
            if pause is not None and i % PAUSE_EVERY_RECORDS == 0:
                pause()
            try:
                token = clean(record, ctx)
                if secret is not None and table.secret(token) != secret:
                    raise RecordRejected("forbidden_token", "properties.token")
                queue = route(endpoint, token, now)
                if queue is not BLOCKED:
                    append((queue, encode_record(record, max_record_bytes, plain)))
                accepted += 1
            except RecordRejected as exc:
                rejected.append((i, exc))
                self.count("rejected", endpoint, exc.reason)
        return pairs, rejected, accepted

    def route_batch(self, endpoint, records, ctx, table, now, plain):
        """route_all of a batch: its records cleaned one by one, then routed and encoded
        as a whole (RoutingTable.route_many, encode_run).

        PERF: a batch's records usually share a token, so its queue is looked up once,
        and they are encoded by one map(): a 50-event batch went from 1,722,313 to
        1,614,670 instructions in process (bench.instructions --shapes batch50)."""
        clean = self.cleaners[endpoint]
        tokens, rejected = [], []
        keep = tokens.append
        for record in records:
            try:
                keep(clean(record, ctx))
            except RecordRejected as exc:
                rejected.append((len(tokens) + len(rejected), exc))
                self.count("rejected", endpoint, exc.reason)
        if not tokens:
            return [], rejected, 0
        kept, index = _kept(records, rejected) if rejected else (records, None)
        pairs, refused, accepted = self.encode_run(
            endpoint, kept, table.route_many(endpoint, tokens, now), plain)
        if refused:
            rejected = _merged(rejected, refused, index)
        return pairs, rejected, accepted

    def encode_run(self, endpoint, records, queues, plain):
        """(pairs, rejected, accepted) for cleaned, routed `records` (their `queues`):
        each one encoded as route_all's loop would, records of a blocked token skipped;
        rejections are indexed in `records`.

        PERF: when every record takes the fast encoder and fits, they are encoded by one
        map() over the batch."""
        max_record_bytes = self.settings.max_record_bytes
        if plain and BLOCKED not in set(queues):
            try:
                payloads = list(map(FAST_ENCODE, records))
            except Exception:    # a lone surrogate: encode_record decides below
                payloads = None
            if payloads is not None and max(map(len, payloads)) <= max_record_bytes:
                return list(zip(queues, payloads)), [], len(records)
        pairs, rejected, accepted = [], [], 0
        for i, record in enumerate(records):
            queue = queues[i]
            try:
                if queue is not BLOCKED:
                    pairs.append((queue, encode_record(record, max_record_bytes, plain)))
                accepted += 1
            except RecordRejected as exc:
                rejected.append((i, exc))
                self.count("rejected", endpoint, exc.reason)
        return pairs, rejected, accepted
