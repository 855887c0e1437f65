"""The worker's environ (ingest/wsgi_server.build_environ) is what eventlet's own
HttpProtocol.get_environ builds, request for request, and the fast header path gives
the same headers as the standard parser.  No sockets: a protocol object is set up by
hand around in-memory files."""
import io
import sys
import warnings

import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import eventlet.wsgi

from ingest.http.headers import parse_plain
from ingest.wsgi_exchange import build_environ
from ingest.wsgi_server import IngestProtocol


class FakeSocket:
    def getsockname(self):
        return ("127.0.0.1", 8100)


def protocol(request_line, header_lines):
    server = eventlet.wsgi.Server(None, ("127.0.0.1", 8100), None,
                                  environ={"ingest.body_timeout_s": 30.0})
    p = object.__new__(IngestProtocol)
    p.server = server
    p.request = p.connection = FakeSocket()
    p.client_address = ("10.0.0.7", 51234)
    p.conn_state = [p.client_address, p.request, eventlet.wsgi.STATE_REQUEST]
    p.rfile, p.wfile = io.BytesIO(), io.BytesIO()
    p.command, p.path, _ = request_line.split(" ")
    import http.client
    p.headers = http.client.parse_headers(io.BytesIO(b"".join(header_lines) + b"\r\n"))
    return p


CASES = [
    ("GET /track?ip=1&data=abc HTTP/1.1", [b"Host: x\r\n", b"User-Agent: a\r\n"]),
    ("POST /track/ HTTP/1.1", [b"Host: x\r\n", b"Content-Type: application/x-www-form-urlencoded\r\n",
                               b"Content-Length: 12\r\n", b"Origin: http://o\r\n"]),
    ("POST /a%20b/engage HTTP/1.0", [b"Transfer-Encoding: chunked\r\n", b"X-A: 1\r\n",
                                     b"x-a: 2\r\n", b"X_Under: no\r\n"]),
    ("POST /import HTTP/1.1", [b"Expect: 100-continue\r\n", b"Content-Length: 3\r\n",
                               b"Authorization: Basic eA==\r\n", b"Content-type: text/plain \r\n"]),
    ("GET /ready HTTP/1.1", []),
]


def comparable(env):
    out = {k: v for k, v in env.items() if k not in (
        "wsgi.input", "eventlet.input", "eventlet.set_idle", "wsgi.errors")}
    inp = env["wsgi.input"]
    out["input"] = (inp.content_length, inp.chunked_input, inp.wfile_line)
    return out


@pytest.mark.parametrize("line, headers", CASES)
def test_build_environ_is_eventlets_get_environ(line, headers):
    ours = build_environ(protocol(line, headers))
    theirs = eventlet.wsgi.HttpProtocol.get_environ(protocol(line, headers))
    assert comparable(ours) == comparable(theirs)
    assert ours["wsgi.errors"] is sys.stderr


@pytest.mark.parametrize("line, headers", CASES)
def test_the_fast_header_path_builds_the_same_environ(line, headers):
    fast = protocol(line, headers)
    fast.headers = parse_plain(headers)
    assert fast.headers is not None
    slow = protocol(line, headers)
    assert comparable(build_environ(fast)) == comparable(build_environ(slow))


def test_the_environ_base_is_computed_once_per_connection():
    p = protocol(*CASES[0])
    calls = []
    real = p.request.getsockname
    p.request.getsockname = lambda: calls.append(1) or real()
    build_environ(p)
    build_environ(p)
    assert calls == [1]
