"""One HTTP request written byte for byte on a plain socket, and the answer parsed strictly.

For tests that must control every byte a server sees (hostile input, fuzzing, slow
clients, nginx's own error pages): no HTTP library smooths the edges on either side.  An
answer must be an HTTP/1.x status line, well-formed header lines and a Content-Length
that matches the body; anything else raises `Malformed` holding the bytes that came.
Reads are bounded by the socket timeout and by the Content-Length, never by waiting for
the peer to close.  Only loopback is contacted; nothing here retries or follows a
redirect.  (bench/replay.py has its own minimal client, built for speed, not strictness.)
"""
import socket
import time

HOST = "127.0.0.1"


class Malformed(AssertionError):
    """The bytes the server sent are not an HTTP/1.x response (`data` holds them)."""

    def __init__(self, message, data=b""):
        super().__init__(message)
        self.data = data


class Response:
    def __init__(self, version, status, reason, headers, body, raw):
        self.version, self.status, self.reason = version, status, reason
        self.headers, self.body, self.raw = headers, body, raw   # headers: lower-case names

    @property
    def head(self):
        """The status line and header lines as received, without the blank line."""
        return self.raw.partition(b"\r\n\r\n")[0]

    def header(self, name):
        return self.headers.get(name.lower())

    def __repr__(self):
        return "<Response %s %r>" % (self.status, self.raw[:300])


# ---- building and sending ------------------------------------------------------------

def request(method, target, headers=(), body=b"", close=True):
    """Bytes of one HTTP/1.1 request; Content-Length is added for a body."""
    lines = ["%s %s HTTP/1.1" % (method, target), "Host: 127.0.0.1"]
    lines += ["%s: %s" % h for h in headers]
    if body and not any(h[0].lower() == "content-length" for h in headers):
        lines.append("Content-Length: %d" % len(body))
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def connect(port, timeout=5.0):
    """A TCP connection to HOST:port with Nagle off, so small writes go out at once."""
    sock = socket.create_connection((HOST, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def send(sock, raw, half_close=False):
    """Write `raw`, then half-close when asked (the server then knows no more bytes come,
    so a request cut short is answered instead of waited for).  A failed write is
    ignored: the server may answer (414, 413) and close before taking every byte, and
    that answer is what the caller reads next."""
    try:
        sock.sendall(raw)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def exchange(port, raw, half_close=True, timeout=5.0):
    """One request on a fresh connection; returns the Response and whether the server
    then closed the connection."""
    with connect(port, timeout) as sock:
        send(sock, raw, half_close)
        resp, extra = read_response(sock)
        try:
            closed = not extra and not sock.recv(1)
        except OSError:
            closed = True
        return resp, closed


def roundtrip(port, raw, timeout=5.0):
    """One request on a fresh connection and its answer; the connection is closed without
    waiting for the server (which may keep it open, as nginx does after a 413)."""
    with connect(port, timeout) as sock:
        sock.sendall(raw)
        resp, _ = read_response(sock)
    return resp


def closed_by_peer(sock, timeout):
    """Seconds until the server closes `sock`, and the bytes received meanwhile."""
    sock.settimeout(timeout)
    started, got = time.monotonic(), b""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            got += data
    except ConnectionResetError:
        pass
    return time.monotonic() - started, got


# ---- reading ----------------------------------------------------------------------------

def read_response(sock, buf=b"", no_body=False):
    """Read one response from `sock` (after bytes already in `buf`); returns
    (Response, leftover bytes).  Raises EOFError when the peer closed before any byte,
    Malformed when what arrived is not a well-formed HTTP/1.x response.  `no_body` is for
    the answer to HEAD (a Content-Length but no body)."""
    buf = _read_head(sock, buf)
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or parts[0] not in (b"HTTP/1.0", b"HTTP/1.1") or not parts[1].isdigit():
        raise Malformed("no HTTP status line: %r" % buf[:300], buf + _drain(sock))
    headers = _parse_headers(lines[1:], buf)
    length = 0 if no_body else int(headers["content-length"])
    while len(rest) < length:
        try:
            rest += _recv_some(sock)
        except EOFError:
            raise Malformed("body shorter than Content-Length %d: %r" % (length, buf[:300]), buf)
    resp = Response(parts[0].decode(), int(parts[1]), parts[2].decode("latin-1") if len(parts) > 2
                    else "", headers, rest[:length], head + b"\r\n\r\n" + rest[:length])
    return resp, rest[length:]


def _parse_headers(lines, buf):
    """{lower-case name: value}; the answer must carry a Content-Length and no chunking."""
    headers = {}
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            raise Malformed("bad header line %r in %r" % (line, buf[:300]), buf)
        headers[name.decode("latin-1").lower()] = value.strip().decode("latin-1")
    if "transfer-encoding" in headers:
        raise Malformed("chunked answer; the worker always sends Content-Length: %r"
                        % buf[:300], buf)
    if "content-length" not in headers or not headers["content-length"].isdigit():
        raise Malformed("answer without a valid Content-Length: %r" % buf[:300], buf)
    return headers


def _recv_some(sock):
    data = sock.recv(65536)
    if not data:
        raise EOFError
    return data


def _read_head(sock, buf):
    """Bytes up to the end of a response head (the blank line)."""
    while b"\r\n\r\n" not in buf:
        try:
            buf += _recv_some(sock)
        except EOFError:
            if not buf:
                raise
            buf += _drain(sock)
            if buf.lstrip().startswith(b"HTTP/"):
                raise Malformed("connection closed inside the response head: %r" % buf[:300], buf)
            raise Malformed("no HTTP status line: %r" % buf[:300], buf)
        if len(buf) > 1 << 20:
            raise Malformed("response head larger than 1 MB", buf)
    return buf


def _drain(sock, timeout=0.3):
    """What else the peer sends until it closes or pauses (for failure messages)."""
    got, saved = b"", sock.gettimeout()
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return got
            got += data
    except OSError:
        return got
    finally:
        sock.settimeout(saved)


# ---- what every answer must be --------------------------------------------------------------

def assert_clean(resp, status):
    """The answer every hostile request must get: the expected status, a body that is
    exactly Content-Length long, no traceback, never a 5xx but 503."""
    assert resp.status == status, resp
    assert int(resp.header("content-length")) == len(resp.body)
    assert b"Traceback" not in resp.body and b'File "' not in resp.body, resp
