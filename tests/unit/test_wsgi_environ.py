"""The worker's environ (ingest/wsgi_server.build_environ) is what eventlet's own
HttpProtocol.get_environ builds, request for request, and the fast header path gives
the same headers as the standard parser; the connection's DeadlineReader cuts each recv
to what is left of the deadline of what is being read.  No sockets: a protocol object is
set up by hand around in-memory files, the reader over a scripted socket."""
import io
import socket
import sys
import time
import warnings

import pytest

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import eventlet.wsgi

from ingest.deadline_io import LINE_AWAITED, LINE_BEGUN, DeadlinePassed, DeadlineReader
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


# ---- DeadlineReader: the deadline of what is being read, on each recv ----------------------

class ScriptedSocket:
    """recv_into answers from a list of chunks (an exception is raised instead); records
    the timeout each recv ran under."""

    def __init__(self, chunks, timeout=5.0):
        self.chunks = list(chunks)
        self.timeout = timeout
        self.recv_timeouts = []

    def gettimeout(self):
        return self.timeout

    def settimeout(self, value):
        self.timeout = value

    def recv_into(self, buf):
        self.recv_timeouts.append(self.timeout)
        chunk = self.chunks.pop(0)
        if isinstance(chunk, BaseException):
            raise chunk
        buf[:len(chunk)] = chunk
        return len(chunk)


def reader_over(sock):
    raw = DeadlineReader(sock)
    return raw, io.BufferedReader(raw, 8192)


TIMES_OUT = "the wait's timeout fires"


class GreenScripted(ScriptedSocket):
    """A green socket's shape: `fd` (the kernel socket, answering from `now`, where
    BlockingIOError means no data yet) beside the green recv_into and the wait
    (_trampoline, which records its timeout and may raise what `waits` holds; for
    TIMES_OUT, the exception it was given for its timeout)."""

    def __init__(self, now, chunks, waits=()):
        super().__init__(chunks)
        self.fd = ScriptedSocket(now)
        self.waits = list(waits)
        self.wait_timeouts = []

    def _trampoline(self, fd, read=False, write=False, timeout=None, timeout_exc=None):
        assert fd is self.fd and read and isinstance(timeout_exc, socket.timeout)
        self.wait_timeouts.append(timeout)
        if self.waits:
            what = self.waits.pop(0)
            raise timeout_exc if what is TIMES_OUT else what


def test_a_near_deadline_cuts_the_wait_and_leaves_the_socket_timeout_alone():
    sock = GreenScripted([BlockingIOError(), b"X-A: 1\r\n"], [])
    raw, rfile = reader_over(sock)
    raw.deadline = time.monotonic() + 1.0
    assert rfile.readline() == b"X-A: 1\r\n"
    assert 0 < sock.wait_timeouts[0] <= 1.0 and sock.timeout == 5.0


def test_a_far_deadline_leaves_the_per_read_timeout_alone():
    sock = GreenScripted([BlockingIOError(), b"X-A: 1\r\n"], [])
    raw, rfile = reader_over(sock)
    raw.deadline = time.monotonic() + 60
    rfile.readline()
    assert sock.wait_timeouts == [5.0]


def test_a_wait_that_times_out_under_the_deadline_is_deadline_passed():
    sock = GreenScripted([b"X-A", BlockingIOError()], [], waits=[TIMES_OUT])
    raw, rfile = reader_over(sock)
    raw.deadline = time.monotonic() + 1.0
    with pytest.raises(DeadlinePassed):
        rfile.readline()
    assert 0 < sock.wait_timeouts[0] <= 1.0 and sock.timeout == 5.0


def test_a_passed_deadline_is_refused_before_any_recv():
    sock = GreenScripted([b"never read"], [])
    raw, rfile = reader_over(sock)
    raw.deadline = time.monotonic() - 0.001
    with pytest.raises(DeadlinePassed):
        rfile.readline()
    assert sock.fd.recv_timeouts == [] and isinstance(DeadlinePassed(), TimeoutError)


def test_ready_data_is_read_from_the_kernel_socket_without_the_green_one():
    sock = GreenScripted([b"GET / HTTP/1.1\r\n"], [])
    raw, rfile = reader_over(sock)
    assert rfile.readline() == b"GET / HTTP/1.1\r\n"
    assert sock.recv_timeouts == [] and sock.wait_timeouts == []


def test_no_data_yet_waits_under_the_socket_timeout_then_reads_again():
    sock = GreenScripted([BlockingIOError(), BlockingIOError(), b"GET / HTTP/1.1\r\n"], [])
    raw, rfile = reader_over(sock)
    assert rfile.readline() == b"GET / HTTP/1.1\r\n"
    assert sock.wait_timeouts == [5.0, 5.0] and sock.recv_timeouts == []


def test_a_request_line_is_awaited_for_the_keep_alive_timeout():
    sock = GreenScripted([BlockingIOError(), b"GET / HTTP/1.1\r\n"], [])
    raw, rfile = reader_over(sock)
    raw.idle_timeout = 75.0
    assert rfile.readline() == b"GET / HTTP/1.1\r\n"
    assert sock.wait_timeouts == [75.0] and sock.timeout == 5.0


def awaiting_a_line(sock, idle_timeout=75.0, line_budget=1.0):
    """A reader as _read_request_line leaves it while it waits for a request line."""
    raw, rfile = reader_over(sock)
    raw.idle_timeout, raw.line_budget, raw.line_state = idle_timeout, line_budget, LINE_AWAITED
    return raw, rfile


@pytest.mark.parametrize("idle_timeout", [75.0, None], ids=["keep-alive", "no keep-alive"])
def test_the_rest_of_a_begun_request_line_gets_the_read_timeout_as_a_whole(idle_timeout):
    """Its first bytes begin the line; the next read waits at most what is left of the
    1 s budget (through the green socket), not a keep-alive wait or a whole read
    timeout, and a read past it is DeadlinePassed."""
    sock = GreenScripted([b"GET /tr", BlockingIOError()], [], waits=[TIMES_OUT])
    raw, rfile = awaiting_a_line(sock, idle_timeout)
    with pytest.raises(DeadlinePassed):
        rfile.readline()
    assert raw.line_state == LINE_BEGUN and raw.idle_timeout is None
    assert len(sock.wait_timeouts) == 1 and 0 < sock.wait_timeouts[0] <= 1.0


def test_a_line_that_comes_whole_sets_no_deadline():
    sock = GreenScripted([b"GET / HTTP/1.1\r\n"], [])
    raw, rfile = awaiting_a_line(sock)
    assert rfile.readline() == b"GET / HTTP/1.1\r\n"
    assert raw.line_state == LINE_BEGUN and raw.deadline is None


def test_an_empty_read_or_no_budget_starts_no_line_deadline():
    sock = GreenScripted([b""], [])
    raw, rfile = awaiting_a_line(sock)
    assert rfile.readline() == b""                 # the client closed: no line began
    assert raw.line_state == LINE_AWAITED and raw.deadline is None
    sock = GreenScripted([b"GET /", BlockingIOError(), b" HTTP/1.1\r\n"], [])
    raw, rfile = awaiting_a_line(sock, line_budget=None)    # --read-timeout-s 0
    assert rfile.readline() == b"GET / HTTP/1.1\r\n"
    assert raw.deadline is None and sock.wait_timeouts == [75.0]


def test_a_socket_closed_while_waiting_ends_the_read_as_eventlet_does():
    from eventlet.hubs import IOClosed
    sock = GreenScripted([BlockingIOError()], [], waits=[IOClosed()])
    raw, rfile = reader_over(sock)
    with pytest.raises(EOFError):
        rfile.readline()


def test_a_wait_that_times_out_raises_the_socket_timeout():
    sock = GreenScripted([BlockingIOError()], [], waits=[socket.timeout("timed out")])
    raw, rfile = reader_over(sock)
    with pytest.raises(socket.timeout):
        rfile.readline()


def test_with_a_deadline_data_already_there_is_read_at_once():
    sock = GreenScripted([b"X-A: 1\r\n"], [b"never read"])
    raw, rfile = reader_over(sock)
    raw.deadline = time.monotonic() + 60
    assert rfile.readline() == b"X-A: 1\r\n"
    assert sock.wait_timeouts == [] and sock.recv_timeouts == []    # not the green socket


# ---- send_answer: straight to the kernel socket, the green one for what is left ------------

class SendScripted:
    """`fd.send` takes at most `room` bytes (BlockingIOError when none); the green
    sendall records what it was handed."""

    def __init__(self, room):
        outer = self
        self.kernel, self.green = [], []

        class Fd:
            def send(self, data):
                if not room:
                    raise BlockingIOError()
                outer.kernel.append(bytes(data[:room]))
                return min(room, len(data))
        self.fd = Fd()

    def sendall(self, data):
        self.green.append(bytes(data))


@pytest.mark.parametrize("room, kernel, green", [
    (1000, [b"HTTP/1.1 200 OK\r\n\r\n1"], []),
    (5, [b"HTTP/"], [b"1.1 200 OK\r\n\r\n1"]),
    (0, [], [b"HTTP/1.1 200 OK\r\n\r\n1"]),
])
def test_an_answer_goes_to_the_kernel_socket_and_the_rest_through_the_green_one(room, kernel,
                                                                               green):
    from ingest.wsgi_exchange import send_answer
    conn = SendScripted(room)
    send_answer(conn, b"HTTP/1.1 200 OK\r\n\r\n1")
    assert conn.kernel == kernel and conn.green == green


def test_a_reset_on_the_kernel_socket_is_read_the_way_eventlet_reads_it():
    """eventlet's green recv reads a reset (or shut) connection as the end of the stream
    and raises any other error; so does the direct read."""
    import errno
    sock = GreenScripted([ConnectionResetError(errno.ECONNRESET, "reset")], [])
    raw, rfile = reader_over(sock)
    assert rfile.readline() == b"" and sock.wait_timeouts == [] and sock.recv_timeouts == []
    sock = GreenScripted([OSError(errno.ETIMEDOUT, "timed out")], [])
    raw, rfile = reader_over(sock)
    with pytest.raises(TimeoutError):
        rfile.readline()
    sock = GreenScripted([OSError(errno.ENOTCONN, "not connected"), b"GET /\r\n"], [])
    raw, rfile = reader_over(sock)
    assert rfile.readline() == b"GET /\r\n" and sock.wait_timeouts == [5.0]




@pytest.mark.parametrize("expect_continue", [False, True])
def test_an_answer_to_a_request_that_asked_for_100_continue_follows_it_through_the_writer(
        expect_continue):
    """Eventlet marks a 100 Continue sent only once its flush returned, so part of one
    may still sit in the connection's buffered writer: the answer to any request that
    asked for one goes through that writer, behind it; any other straight to the socket."""
    from ingest.wsgi_exchange import respond
    p = protocol("POST /track HTTP/1.1", [b"Host: x\r\n"])
    p.headers = parse_plain([b"Host: x\r\n"])
    p.request_version = "HTTP/1.1"
    p.close_connection = 0
    p.connection = SendScripted(1 << 20)
    p.server.keepalive = True
    wfile = p.wfile if expect_continue else None
    request_input = eventlet.wsgi.Input(io.BytesIO(b"data=x"), 6, p.connection, wfile=wfile,
                                        wfile_line=b"HTTP/1.1 100 Continue\r\n" if wfile else None)
    p.environ = {"eventlet.input": request_input, "wsgi.input": request_input,
                 "eventlet.posthooks": []}

    def app(environ, start_response):      # answers without reading the body
        start_response("200 OK", [("Content-Length", "1")])
        return [b"1"]
    p.application = app
    respond(p)
    sent_to_socket = b"".join(p.connection.kernel + p.connection.green)
    if expect_continue:
        assert p.wfile.getvalue().startswith(b"HTTP/1.1 200 OK\r\n") and sent_to_socket == b""
    else:
        assert sent_to_socket.startswith(b"HTTP/1.1 200 OK\r\n") and p.wfile.getvalue() == b""
