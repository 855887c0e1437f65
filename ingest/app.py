"""make_app(settings, sink, clock) -> the WSGI application; the one place that turns
errors into HTTP responses.

Per request: decode (decode.py) -> clean (clean.py) -> route (routing.py) -> enqueue
(sink.put, which returns only once every record is STORED or spooled) -> respond.  Plain
Python: no eventlet, no sockets, so any WSGI server can host it and unit tests drive it
with an in-memory sink and a fixed clock.  Responses follow shared/docs/mixpanel-api.md
section 2: 200 with `1`/`0` (or verbose JSON) for every well-formed request, 413 for too
much, 503 + Retry-After when records cannot be stored, CORS on everything.
"""
import base64
import binascii
import ipaddress
import json
import json.encoder
import logging
import re
import time
import zlib

import simplejson

from ingest import clean as cleaning
from ingest import decode
from ingest.errors import IngestError, RecordRejected
from ingest.routing import BLOCKED
from ingest.sink import SinkUnavailable

log = logging.getLogger("ingest.app")

ENDPOINTS = frozenset(("track", "engage", "groups", "import"))
_STATUS = {200: "200 OK", 204: "204 No Content", 302: "302 Found", 400: "400 Bad Request",
           401: "401 Unauthorized", 404: "404 Not Found", 405: "405 Method Not Allowed",
           413: "413 Payload Too Large", 414: "414 URI Too Long", 415: "415 Unsupported Media Type",
           431: "431 Request Header Fields Too Large", 500: "500 Internal Server Error",
           503: "503 Service Unavailable"}
_PHRASE = {code: text.split(" ", 1)[1] for code, text in _STATUS.items()}
# A 1x1 transparent GIF for img=1.
PIXEL_GIF = (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00"
             b"\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")
_CALLBACK_RE = re.compile(r"[A-Za-z_$][\w$]*(?:\.[A-Za-z_$][\w$]*)*\Z", re.ASCII)
_HEADER_LIST_RE = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~ ,-]*\Z")
_MAX_CALLBACK = 128
_REDIRECT_CHARS = re.compile(r"[!-\[\]-~]+\Z", re.ASCII)   # printable ASCII but space and backslash
# /import strict answers use the OpenAPI's phrases.
_STRICT_PHRASE = {413: "Request Entity Too Large", 400: "Bad Request", 401: "Unauthorized"}
_TEXT = "text/plain; charset=utf-8"
_JSON = "application/json"
_NO_CACHE = ("Cache-Control", "no-cache, no-store")
# PERF: one pre-built encoder; compact separators, UTF-8 out (DESIGN: records are compact
# JSON).  The standard library's C encoder writes a typical event in ~3 us against ~7 us
# for simplejson's with ensure_ascii=False (decoding stays simplejson, as the design asks),
# and building its C encoder once instead of per call (as JSONEncoder.encode does) saves
# another ~1 us.  No circular-reference markers: records come from JSON text, so they
# cannot contain cycles.  allow_nan=False refuses an infinity parsed from 1e400.
def _encode_error(value):
    raise TypeError("not JSON serialisable: %s" % type(value).__name__)


if json.encoder.c_make_encoder is not None:
    _C_ENCODER = json.encoder.c_make_encoder(None, _encode_error, json.encoder.encode_basestring,
                                             None, ":", ",", False, False, False)

    def _encode(record):
        return "".join(_C_ENCODER(record, 0))
else:  # pragma: no cover - CPython always has the C encoder
    _encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
_TRUE = ("1", "true")


class AppState:
    """Mutable per-process state the server shares with the app (single event loop)."""

    def __init__(self):
        self.draining = False
        self.in_flight = 0
        self.body_bytes = 0        # Content-Length of the requests in flight, together


class Answer:
    """How this request wants its answer: plain, verbose JSON, JSONP, pixel or redirect."""

    __slots__ = ("verbose", "callback", "img", "redirect", "strict")

    def __init__(self, params, endpoint):
        self.verbose = params.get("verbose") in _TRUE
        self.img = params.get("img") in _TRUE
        self.strict = endpoint == "import" and params.get("strict") in _TRUE
        callback = params.get("callback")
        if callback is not None and (len(callback) > _MAX_CALLBACK
                                     or not _CALLBACK_RE.match(callback)):
            raise IngestError(400, "invalid_callback",
                              "callback must be a JavaScript identifier or dotted path")
        self.callback = callback or None
        redirect = params.get("redirect")
        if redirect is not None and not _safe_redirect(redirect):
            raise IngestError(400, "invalid_redirect", "redirect must be an http(s) URL")
        self.redirect = redirect or None


def _safe_redirect(url):
    """An absolute http(s) URL of printable ASCII only (it goes into a Location header)."""
    lowered = url[:8].lower()
    if not (lowered.startswith("http://") or lowered.startswith("https://")):
        return False
    if len(url) > 2048 or not _REDIRECT_CHARS.match(url):
        return False
    host = url.split("//", 1)[1]
    return host[:1] not in ("", "/")


def _query_answer(environ, endpoint):
    """The answer shape from the query string alone, for failures before the body parsed."""
    try:
        return Answer(decode.parse_pairs(environ.get("QUERY_STRING", ""), {}), endpoint)
    except IngestError:
        return None


def _endpoint(path):
    """`/track`, `/track/`, `/prefix/track` -> 'track'; None for anything else."""
    trimmed = path.rstrip("/")
    name = trimmed[trimmed.rfind("/") + 1:]
    return name if name in ENDPOINTS else None


def basic_secret(header):
    """The secret in an `Authorization: Basic` header: the user when the password is empty
    (API secret), else the password (service account); None when absent or malformed."""
    if not header or header[:6].lower() != "basic ":
        return None
    try:
        user, _, password = base64.b64decode(header[6:].strip(), validate=True) \
            .decode("utf-8").partition(":")
    except (binascii.Error, ValueError):
        return None
    return (password or user) or None


class ClientIP:
    """Client address: left-most X-Forwarded-For when the peer is a trusted proxy."""

    def __init__(self, trusted_networks):
        self.networks = tuple(trusted_networks)
        self._cache = {}

    def trusted(self, peer):
        hit = self._cache.get(peer)
        if hit is None:
            try:
                address = ipaddress.ip_address(peer)
                hit = any(address in net for net in self.networks)
            except ValueError:
                hit = False
            if len(self._cache) > 4096:   # bounded: peers behind nginx are few
                self._cache.clear()
            self._cache[peer] = hit
        return hit

    def __call__(self, environ):
        peer = environ.get("REMOTE_ADDR") or ""
        forwarded = environ.get("HTTP_X_FORWARDED_FOR")
        if forwarded and self.trusted(peer):
            first = forwarded.split(",", 1)[0].strip()
            try:
                return str(ipaddress.ip_address(first))
            except ValueError:
                return peer
        return peer


def make_app(settings, sink, clock=time.time, router=None, state=None, metrics=None,
             access_log=None, timer=time.perf_counter):
    """Build the WSGI callable.  Nothing is created at import time; tests pass a MemorySink
    and a fixed clock.  `metrics` (ingest.metrics.Metrics) and `access_log` (a callable
    taking one line of bytes) are optional."""
    if router is None:
        from ingest.routing import Router
        router = Router(settings.routes)
    state = state or AppState()
    client_ip = ClientIP(settings.trusted_proxies)
    cleaners = {name: cleaning.cleaner(name) for name in ENDPOINTS}
    max_body = settings.max_body_bytes
    max_records = settings.max_records
    max_record_bytes = settings.max_record_bytes
    max_properties = settings.max_properties
    max_depth = settings.max_depth
    max_string = settings.max_string_chars
    max_headers = settings.max_headers
    max_in_flight = settings.max_in_flight
    max_body_in_flight = settings.max_body_bytes_in_flight
    count = metrics.count if metrics is not None else _no_count

    def cors(environ, headers):
        origin = environ.get("HTTP_ORIGIN")
        if origin:
            headers.append(("Access-Control-Allow-Origin", origin))
            headers.append(("Access-Control-Allow-Credentials", "true"))
            headers.append(("Vary", "Origin"))
        else:
            headers.append(("Access-Control-Allow-Origin", "*"))
        return headers

    def respond(environ, start_response, status, body, content_type, extra=()):
        environ["ingest.status"] = status
        environ["ingest.bytes"] = len(body)
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body))), _NO_CACHE]
        headers.extend(extra)
        start_response(_STATUS[status], cors(environ, headers))
        # HEAD: the same headers (Content-Length of the body a GET would get), no body.
        return [b""] if environ.get("REQUEST_METHOD") == "HEAD" else [body]

    def fail(environ, start_response, status, message, retry_after_s=None, extra=()):
        """A JSON error answer, with Retry-After when the client should come back."""
        if retry_after_s is not None:
            extra = extra + (("Retry-After", str(retry_after_s)),)
        return respond(environ, start_response, status,
                       _json({"status": 0, "error": message}), _JSON, extra)

    def preflight(environ, start_response):
        headers = [("Content-Length", "0"), _NO_CACHE,
                   ("Access-Control-Allow-Methods", "GET, POST, OPTIONS"),
                   ("Access-Control-Max-Age", "86400")]
        requested = environ.get("HTTP_ACCESS_CONTROL_REQUEST_HEADERS")
        if requested and len(requested) <= 1024 and _HEADER_LIST_RE.match(requested):
            headers.append(("Access-Control-Allow-Headers", requested))
        environ["ingest.status"] = 204
        start_response(_STATUS[204], cors(environ, headers))
        return [b""]

    def error_body(exc, answer):
        """A request-level failure, in the shape this client reads."""
        if answer is not None and answer.strict:
            # /import strict answers every failure as JSON with a real status (400 for
            # undecodable data, where the legacy answer is 200 `0`).
            code = 400 if exc.status == 200 else exc.status
            return code, _json({"code": code, "error": exc.message,
                                "status": _STRICT_PHRASE.get(code, _PHRASE.get(code, "Error"))}), _JSON
        if exc.status == 200:
            return result(answer, 0, exc.message)
        return exc.status, _json({"status": 0, "error": exc.message}), _JSON

    def result(answer, status, error):
        """Body for a processed request: status is 1 (something accepted) or 0.

        verbose=1 gives JSON; callback= wraps whichever of the two in a call."""
        if answer is not None and answer.verbose:
            body, ctype = _json({"status": status, "error": error}), _JSON
        else:
            body, ctype = (b"1" if status else b"0"), _TEXT
        if answer is not None and answer.callback:
            return 200, b"%s(%s)" % (answer.callback.encode(), body), "text/javascript"
        return 200, body, ctype

    def read_body(environ):
        length = environ.get("CONTENT_LENGTH")
        stream = environ["wsgi.input"]
        try:
            if length:
                n = int(length)
                if n > max_body:
                    raise IngestError(413, "body_too_large",
                                      "request body exceeds %d bytes" % max_body)
                body = stream.read(n) if n else b""
                if len(body) < n:
                    raise IngestError(400, "short_body", "request body ended early")
            elif environ.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked":
                body = stream.read(max_body + 1)
                if len(body) > max_body:
                    raise IngestError(413, "body_too_large",
                                      "request body exceeds %d bytes" % max_body)
            else:
                return b""
        except (ValueError, OSError):
            # A bad chunk header, a body cut short, or a client silent past the read
            # timeout: the server raises from the input stream.
            raise IngestError(400, "bad_body", "request body could not be read") from None
        encoding = environ.get("HTTP_CONTENT_ENCODING", "").strip().lower()
        if encoding and encoding != "identity":
            body = _decompress(body, encoding, max_body)
        return body

    def credential_ok(environ, params, table):
        """The configured secret this request proves, from Basic auth or `api_key`.

        The Python SDK sends both (Basic with the API secret, api_key with the project's
        API key), so either may be the one that matches."""
        for secret in (basic_secret(environ.get("HTTP_AUTHORIZATION")), params.get("api_key")):
            if secret and table.secret_matches(secret):
                return secret
        raise IngestError(401, "invalid_credentials", "Invalid credentials")

    def process(environ, endpoint, params, answer):
        """Decode, clean, route and store; returns (accepted, rejected list)."""
        table = router.table
        secret = credential_ok(environ, params, table) if endpoint == "import" else None
        data = params.get("data")
        records = decode.decode_data(data)
        if len(records) > max_records:
            raise IngestError(413, "too_many_records",
                              "%d records exceed the limit of %d" % (len(records), max_records))
        now = clock()
        ip = client_ip(environ) if params.get("ip") in _TRUE else None
        ctx = cleaning.Context(now, ip, max_properties, max_depth, max_string, len(data))
        clean = cleaners[endpoint]
        pairs, rejected, accepted = [], [], 0
        for i, record in enumerate(records):
            try:
                token = clean(record, ctx)
                if secret is not None and table.secret(token) != secret:
                    raise RecordRejected("forbidden_token", "properties.token",
                                         "credentials are not valid for this token")
                queue = table.route(endpoint, token, now)
                if queue is BLOCKED:
                    accepted += 1
                    continue
                try:
                    payload = _encode(record).encode("utf-8")
                except UnicodeEncodeError:
                    raise RecordRejected("invalid_unicode", "record",
                                         "record contains invalid Unicode (lone surrogate)")
                except ValueError:   # allow_nan=False: 1e400 parsed as infinity
                    raise RecordRejected("invalid_number", "record",
                                         "record contains a number out of range")
                if len(payload) > max_record_bytes:
                    raise RecordRejected("record_too_large", "record",
                                         "record exceeds %d bytes" % max_record_bytes)
                pairs.append((queue, payload))
                accepted += 1
            except RecordRejected as exc:
                rejected.append((i, exc))
                count("rejected", endpoint, exc.reason)
        environ["ingest.accepted"] = accepted
        environ["ingest.rejected"] = len(rejected)
        if pairs:
            sink.put(pairs)
            if metrics is not None:
                metrics.accepted_pairs(endpoint, pairs)
        return accepted, rejected, records

    def strict_body(accepted, rejected, records):
        failed = []
        for i, exc in rejected:
            rec = records[i]
            props = rec.get("properties") if isinstance(rec, dict) else None
            insert_id = props.get("$insert_id") if isinstance(props, dict) else None
            failed.append({"index": i, "$insert_id": insert_id if isinstance(insert_id, str) else None,
                           "field": exc.field, "message": exc.message})
        if not failed:
            return 200, _json({"code": 200, "num_records_imported": accepted, "status": "OK"}), _JSON
        return 400, _json({"code": 400, "error": "some data points in the request failed validation",
                           "status": "Bad Request", "num_records_imported": accepted,
                           "failed_records": failed}), _JSON

    def handle(environ, start_response, endpoint):
        answer = None
        try:
            body = read_body(environ)
            params = decode.read_params(environ.get("QUERY_STRING", ""),
                                        environ.get("CONTENT_TYPE", ""), body)
            answer = Answer(params, endpoint)
            accepted, rejected, records = process(environ, endpoint, params, answer)
            if answer.strict:
                status, out, ctype = strict_body(accepted, rejected, records)
            else:
                error = None
                if rejected:
                    i, exc = rejected[0]
                    error = "record %d: %s" % (i, exc.message)
                status, out, ctype = result(answer, 1 if accepted else 0, error)
        except IngestError as exc:
            if answer is None:
                answer = _query_answer(environ, endpoint)
            if exc.status >= 400:
                log.warning("%s %s: %s", endpoint, exc.status, exc.reason)
            count("request_error", endpoint, exc.reason)
            status, out, ctype = error_body(exc, answer)
        except SinkUnavailable as exc:
            log.warning("%s 503: %s", endpoint, exc)
            count("request_error", endpoint, "unavailable")
            return fail(environ, start_response, 503,
                        "temporarily unable to store records; retry", exc.retry_after_s)
        if status == 200 and answer is not None:
            if answer.redirect:
                return respond(environ, start_response, 302, b"", _TEXT,
                               (("Location", answer.redirect),))
            if answer.img:
                return respond(environ, start_response, 200, PIXEL_GIF, "image/gif")
        return respond(environ, start_response, status, out, ctype)

    def dispatch(environ, start_response):
        path = environ.get("PATH_INFO") or "/"
        endpoint = environ["ingest.endpoint"] = _endpoint(path)
        method = environ.get("REQUEST_METHOD", "GET")
        # PERF: len(environ) is O(1); headers are only counted when it is suspicious.
        if len(environ) > max_headers + _ENVIRON_BASE_KEYS and _header_count(environ) > max_headers:
            return fail(environ, start_response, 431, "more than %d header lines" % max_headers)
        if endpoint is None:
            return other_path(environ, start_response, path, method)
        if method == "OPTIONS":
            return preflight(environ, start_response)
        if method not in ("GET", "POST"):
            return fail(environ, start_response, 405, "method not allowed",
                        extra=(("Allow", "GET, POST, OPTIONS"),))
        # Bodies are read whole; cap what all requests in flight may hold together.
        body_bytes = min(_content_length(environ), max_body)
        busy = state.in_flight >= max_in_flight or (
            state.in_flight and state.body_bytes + body_bytes > max_body_in_flight)
        if busy or state.draining:
            # Draining: a request read now arrived on a connection the server is shutting,
            # so its answer may never be delivered; storing it would only make a duplicate
            # of the client's retry.  Requests already in flight finish normally.
            reason = "draining" if state.draining else "overloaded"
            count("request_error", endpoint, reason)
            return fail(environ, start_response, 503, "server %s; retry" % (
                "shutting down" if state.draining else "busy"), retry_after_s=1)
        state.in_flight += 1
        state.body_bytes += body_bytes
        try:
            return handle(environ, start_response, endpoint)
        except Exception:
            log.exception("unhandled error on %s", endpoint)
            return fail(environ, start_response, 500, "internal error")
        finally:
            state.in_flight -= 1
            state.body_bytes -= body_bytes

    def other_path(environ, start_response, path, method):
        trimmed = path.rstrip("/") or "/"
        if trimmed == "/health":
            return respond(environ, start_response, 200, b'{"status":"ok"}', _JSON)
        if trimmed == "/ready":
            ok, why = sink.ready() if hasattr(sink, "ready") else (True, "")
            if state.draining:
                ok, why = False, "draining"
            if ok:
                return respond(environ, start_response, 200, b'{"status":"ready"}', _JSON)
            return respond(environ, start_response, 503,
                           _json({"status": "unavailable", "reason": why}), _JSON,
                           (("Retry-After", "1"),))
        if trimmed == "/metrics" and metrics is not None:
            body, ctype = metrics.render()
            return respond(environ, start_response, 200, body, ctype)
        if method == "OPTIONS":
            return preflight(environ, start_response)
        return fail(environ, start_response, 404,
                    "not found; use /track, /engage, /groups or /import")

    def observed(environ, start_response):
        """dispatch(), then the metrics and the access-log line for the request."""
        started = timer()
        body = dispatch(environ, start_response)
        elapsed = timer() - started
        endpoint = environ.get("ingest.endpoint") or "other"
        status = environ.get("ingest.status", 0)
        if metrics is not None:
            metrics.request(endpoint, status, elapsed)
        if access_log is not None:
            access_log(_access_line(environ, status, elapsed, clock, client_ip))
        return body

    app = observed if (metrics is not None or access_log is not None) else dispatch
    app.state = state
    app.router = router
    return app


def _access_line(environ, status, elapsed, clock, client_ip):
    """One JSON line: time, client IP, method, path, status, bytes, records, latency."""
    entry = {"time": round(clock(), 3), "ip": client_ip(environ),
             "method": environ.get("REQUEST_METHOD", ""), "path": environ.get("PATH_INFO", ""),
             "status": status, "bytes": environ.get("ingest.bytes", 0),
             "accepted": environ.get("ingest.accepted", 0),
             "rejected": environ.get("ingest.rejected", 0),
             "latency_ms": round(elapsed * 1000, 3)}
    return (json.dumps(entry, separators=(",", ":")) + "\n").encode("utf-8", "replace")


# Keys a WSGI server puts in environ besides the HTTP_* headers (eventlet sets about 20).
_ENVIRON_BASE_KEYS = 20   # eventlet sets 24 non-header keys: counting starts a little early


def _content_length(environ):
    """The declared body size (0 when absent; read_body answers a bad one with 400)."""
    try:
        return max(int(environ.get("CONTENT_LENGTH") or 0), 0)
    except ValueError:
        return 0


def _header_count(environ):
    return sum(1 for key in environ if key.startswith("HTTP_")) + \
        ("CONTENT_TYPE" in environ) + ("CONTENT_LENGTH" in environ)


def _no_count(*_args):
    pass


def _json(obj):
    return simplejson.dumps(obj).encode("utf-8")


def _decompress(body, encoding, limit):
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise IngestError(415, "unsupported_encoding", "Content-Encoding must be gzip")
    wbits = 16 + zlib.MAX_WBITS if encoding != "deflate" else zlib.MAX_WBITS
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
        if len(out) > limit or inflater.unconsumed_tail:
            raise IngestError(413, "body_too_large",
                              "decompressed body exceeds %d bytes" % limit)
        if not inflater.eof:
            raise IngestError(400, "invalid_gzip", "compressed body is truncated")
    except zlib.error:
        raise IngestError(400, "invalid_gzip", "compressed body is not valid gzip") from None
    return out

