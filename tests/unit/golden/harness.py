"""Drive the ingest WSGI app in-process: build PEP 3333 environs, call the app (under
wsgiref.validate by default), and check the invariants every response must keep.

For the unit tier only: no sockets, no eventlet, no threads.  It must not patch or
reach into the app; everything goes through make_app's public arguments.
"""
import dataclasses
import gzip
import io
import sys
from urllib.parse import quote
from wsgiref.validate import validator

from ingest.http import make_app
from ingest.config import resolve
from ingest.routing import RoutingTable
from ingest.sinks.memory import MemorySink

NOW = 1_800_000_000.123          # the fixed arrival time (2027-01-15) most tests use
NOW_MS = 1_800_000_000_123
ALLOWED_STATUSES = {200, 204, 302, 400, 401, 404, 405, 408, 413, 415, 503}


def settings(**changes):
    """Default Settings (no environment, no file) with some fields replaced."""
    return dataclasses.replace(resolve({}, environ={}), **changes)


class StaticRouter:
    """The one attribute the app reads from a Router: the current table."""

    def __init__(self, routes=None):
        self.table = RoutingTable.from_dict(routes or {})


def make(routes=None, now=NOW, state=None, **changes):
    """(app, sink) with a fixed clock and an in-memory sink."""
    sink = MemorySink()
    app = make_app(settings(**changes), sink, clock=lambda: now,
                   router=StaticRouter(routes), state=state)
    return app, sink


class Response:
    def __init__(self, status_line, headers, body):
        self.status = int(status_line.split(" ", 1)[0])
        self.status_line = status_line
        self.header_list = headers
        self.headers = {name.lower(): value for name, value in headers}
        self.body = body

    @property
    def text(self):
        return self.body.decode("utf-8")

    def __repr__(self):
        return "<Response %s %r %r>" % (self.status_line, self.headers, self.body[:200])


def environ(method="GET", path="/track", query="", body=None, content_type=None,
            headers=None, remote="203.0.113.7", content_length=True):
    """A complete WSGI environ.  `headers` are HTTP header names -> values."""
    env = {
        "REQUEST_METHOD": method, "SCRIPT_NAME": "", "PATH_INFO": path,
        "QUERY_STRING": query, "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": remote,
        "wsgi.version": (1, 0), "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body or b""), "wsgi.errors": sys.stderr,
        "wsgi.multithread": False, "wsgi.multiprocess": False, "wsgi.run_once": False,
    }
    if body is not None and content_length:
        env["CONTENT_LENGTH"] = str(len(body))
    if content_type is not None:
        env["CONTENT_TYPE"] = content_type
    for name, value in (headers or {}).items():
        key = name.upper().replace("-", "_")
        if key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            env[key] = value
        else:
            env["HTTP_" + key] = value
    return env


def call(app, method="GET", path="/track", query="", body=None, content_type=None,
         headers=None, remote="203.0.113.7", validate=True, content_length=True):
    """Run one request and check the invariants every answer keeps (see check())."""
    env = environ(method, path, query, body, content_type, headers, remote, content_length)
    seen = {}

    def start_response(status, response_headers, exc_info=None):
        seen["status"], seen["headers"] = status, list(response_headers)
        return lambda data: None

    wsgi = validator(app) if validate else app
    result = wsgi(env, start_response)
    try:
        body_out = b"".join(result)
    finally:
        if hasattr(result, "close"):
            result.close()
    response = Response(seen["status"], seen["headers"], body_out)
    check(response, (headers or {}).get("Origin"), head=method == "HEAD",
          operator=(path.rstrip("/") or "/") in OPERATOR_PATHS)
    return response


# Answered without any CORS header (ingest/http/admin.py).
OPERATOR_PATHS = ("/health", "/ready", "/metrics")


def check(response, origin=None, head=False, operator=False):
    """Invariants of every response: an allowed status (never 500), Content-Length equal
    to the body (for HEAD: no body at all), no caching, and CORS that echoes the caller's
    Origin with credentials, except on operator paths, which carry no CORS at all."""
    assert response.status in ALLOWED_STATUSES, response
    if head:
        assert response.body == b"" and response.headers.get("content-length"), response
    else:
        assert response.headers.get("content-length") == str(len(response.body)), response
    assert response.headers.get("cache-control") == "no-cache, no-store", response
    if operator:
        assert not [h for h in response.headers if h.startswith("access-control")], response
    elif origin:
        assert response.headers.get("access-control-allow-origin") == origin, response
        assert response.headers.get("access-control-allow-credentials") == "true", response


# ---- request builders ------------------------------------------------------------------

def form(**fields):
    """x-www-form-urlencoded as `requests` writes it (space -> '+', '+' -> %2B)."""
    return "&".join("%s=%s" % (k, quote(str(v), safe="").replace("%20", "+"))
                    for k, v in fields.items()).encode("ascii")


def qs(**fields):
    return form(**fields).decode("ascii")


def gz(data):
    return gzip.compress(data)
