"""How the app answers: status lines, CORS, and every body shape the SDKs read.

What it is for: the answers of docs/http-api.md.  A processed request answers 200
with `1`/`0`, or verbose JSON, either wrapped in a JSONP callback, or a pixel (img=1), or
a redirect; /import with strict=1 answers JSON with real statuses.  `error()` is the one
place that turns an IngestError (ingest/errors.py) into an HTTP answer.

What it must not do: echo input (only catalogue messages and validated callback/redirect
values reach a response), or know about sinks, routing or eventlet.
"""
import re

import simplejson

from ingest import decode
from ingest.errors import IngestError
from ingest.http.request import TRUE

STATUS = {200: "200 OK", 204: "204 No Content", 302: "302 Found", 400: "400 Bad Request",
          401: "401 Unauthorized", 404: "404 Not Found", 405: "405 Method Not Allowed",
          408: "408 Request Timeout", 413: "413 Payload Too Large", 414: "414 URI Too Long",
          415: "415 Unsupported Media Type", 431: "431 Request Header Fields Too Large",
          500: "500 Internal Server Error", 503: "503 Service Unavailable"}
PHRASE = {code: text.split(" ", 1)[1] for code, text in STATUS.items()}
# /import strict answers use the OpenAPI's phrases.
STRICT_PHRASE = {413: "Request Entity Too Large", 400: "Bad Request", 401: "Unauthorized"}
# A 1x1 transparent GIF for img=1.
PIXEL_GIF = (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00"
             b"\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")
TEXT = "text/plain; charset=utf-8"
JSON = "application/json"
NO_CACHE = ("Cache-Control", "no-cache, no-store")
_CALLBACK_RE = re.compile(r"[A-Za-z_$][\w$]*(?:\.[A-Za-z_$][\w$]*)*\Z", re.ASCII)
_HEADER_LIST_RE = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~ ,-]*\Z")
_MAX_CALLBACK = 128
_REDIRECT_CHARS = re.compile(r"[!-\[\]-~]+\Z", re.ASCII)   # printable ASCII but space and backslash


def json_body(obj):
    return simplejson.dumps(obj).encode("utf-8")


# PERF: the verbose answers without an error (half of the mixed SDK log's requests) are
# written once, not by simplejson per request.
_VERBOSE_OK = {status: json_body({"status": status, "error": None}) for status in (0, 1)}


class Answer:
    """How this request wants its answer: plain, verbose JSON, JSONP, pixel or redirect."""

    __slots__ = ("verbose", "callback", "img", "redirect", "strict")

    def __init__(self, params, endpoint):
        self.verbose = params.get("verbose") in TRUE
        self.img = params.get("img") in TRUE
        self.strict = endpoint == "import" and params.get("strict") in TRUE
        callback = params.get("callback")
        if callback is not None and (len(callback) > _MAX_CALLBACK
                                     or not _CALLBACK_RE.match(callback)):
            raise IngestError("invalid_callback")
        self.callback = callback or None
        redirect = params.get("redirect")
        if redirect is not None and not _safe_redirect(redirect):
            raise IngestError("invalid_redirect")
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


def query_answer(environ, endpoint):
    """The answer shape from the query string alone, for failures before the body parsed."""
    try:
        return Answer(decode.parse_pairs(environ.get("QUERY_STRING", ""), {}), endpoint)
    except IngestError:
        return None


def cors(environ, headers):
    origin = environ.get("HTTP_ORIGIN")
    if origin:
        headers.append(("Access-Control-Allow-Origin", origin))
        headers.append(("Access-Control-Allow-Credentials", "true"))
        headers.append(("Vary", "Origin"))
    else:
        headers.append(("Access-Control-Allow-Origin", "*"))
    return headers


def respond(environ, start_response, status, body, content_type, extra=(), allow_cors=True):
    """`allow_cors=False` for operator paths: no Access-Control-* at all, so no web page
    can read them from a browser (let alone with the visitor's credentials)."""
    environ["ingest.status"] = status
    environ["ingest.bytes"] = len(body)
    headers = [("Content-Type", content_type), ("Content-Length", str(len(body))), NO_CACHE]
    headers.extend(extra)
    start_response(STATUS[status], cors(environ, headers) if allow_cors else headers)
    # HEAD: the same headers (Content-Length of the body a GET would get), no body.
    return [b""] if environ.get("REQUEST_METHOD") == "HEAD" else [body]


def preflight(environ, start_response):
    headers = [("Content-Length", "0"), NO_CACHE,
               ("Access-Control-Allow-Methods", "GET, POST, OPTIONS"),
               ("Access-Control-Max-Age", "86400")]
    requested = environ.get("HTTP_ACCESS_CONTROL_REQUEST_HEADERS")
    if requested and len(requested) <= 1024 and _HEADER_LIST_RE.match(requested):
        headers.append(("Access-Control-Allow-Headers", requested))
    environ["ingest.status"] = 204
    start_response(STATUS[204], cors(environ, headers))
    return [b""]


def result(answer, status, error):
    """(code, body, content type) for a processed request: status is 1 (something
    accepted) or 0.  verbose=1 gives JSON; callback= wraps whichever of the two."""
    if answer is not None and answer.verbose:
        body = _VERBOSE_OK[status] if error is None else \
            json_body({"status": status, "error": error})
        ctype = JSON
    else:
        body, ctype = (b"1" if status else b"0"), TEXT
    if answer is not None and answer.callback:
        return 200, b"%s(%s)" % (answer.callback.encode(), body), "text/javascript"
    return 200, body, ctype


def insert_id_of(record):
    """A record's properties.$insert_id when it is a string, else None."""
    props = record.get("properties") if isinstance(record, dict) else None
    insert_id = props.get("$insert_id") if isinstance(props, dict) else None
    return insert_id if isinstance(insert_id, str) else None


def strict_result(accepted, rejected, insert_ids):
    """/import strict=1: 200 with the count, or 400 listing every failed record.
    `insert_ids`: index -> $insert_id (or None) of each rejected record."""
    failed = []
    for i, exc in rejected:
        failed.append({"index": i, "$insert_id": insert_ids.get(i),
                       "field": exc.field, "message": exc.message})
    if not failed:
        return 200, json_body({"code": 200, "num_records_imported": accepted, "status": "OK"}), JSON
    return 400, json_body({"code": 400, "error": "some data points in the request failed validation",
                           "status": "Bad Request", "num_records_imported": accepted,
                           "failed_records": failed}), JSON


def processed(answer, accepted, rejected, insert_ids):
    """(code, body, content type) for a request whose records were processed."""
    if answer.strict:
        return strict_result(accepted, rejected, insert_ids)
    error = None
    if rejected:
        i, exc = rejected[0]
        error = "record %d: %s" % (i, exc.message)
    return result(answer, 1 if accepted else 0, error)


def error_parts(exc, answer):
    """(code, body, content type, extra headers) for an IngestError.

    Server-side refusals (5xx) answer in the one JSON shape every SDK's retry logic
    reads; a client's error follows the answer format it asked for: /import strict as
    JSON with a real status (400 for undecodable data, where the legacy answer is 200
    `0`), a legacy 200 as `0`/verbose/JSONP, anything else as {"status": 0, "error"}."""
    extra = exc.headers
    if exc.retry_after_s is not None:
        extra = extra + (("Retry-After", str(exc.retry_after_s)),)
    if exc.status < 500 and answer is not None and answer.strict:
        code = 400 if exc.status == 200 else exc.status
        return code, json_body({"code": code, "error": exc.message,
                                "status": STRICT_PHRASE.get(code, PHRASE.get(code, "Error"))}), \
            JSON, extra
    if exc.status == 200:
        return result(answer, 0, exc.message) + (extra,)
    return exc.status, json_body({"status": 0, "error": exc.message}), JSON, extra


def error(environ, start_response, exc, answer=None):
    """Answer an IngestError: the one place errors become HTTP answers."""
    status, body, ctype, extra = error_parts(exc, answer)
    return finish(environ, start_response, answer, status, body, ctype, extra)


def finish(environ, start_response, answer, status, body, ctype, extra=()):
    """Send the answer; a 200 becomes the redirect or the pixel the request asked for."""
    if status == 200 and answer is not None:
        if answer.redirect:
            return respond(environ, start_response, 302, b"", TEXT,
                           (("Location", answer.redirect),))
        if answer.img:
            return respond(environ, start_response, 200, PIXEL_GIF, "image/gif")
    return respond(environ, start_response, status, body, ctype, extra)
