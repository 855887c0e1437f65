"""One request/response exchange of the worker's HTTP seam, without eventlet's per-request
overheads: the environ built from what is known per connection, and the answer written
in one piece.

What it is for: ingest/wsgi_server.IngestProtocol calls `build_environ` and `respond`
instead of eventlet's get_environ and handle_one_response (eventlet 0.41.3, pinned in
requirements.txt).  They do what those do for the worker's own app (ingest/http/),
whose answers always carry a Content-Length and are one list of bytes; what the app
does not use (the write() callable, streamed bodies, websocket take-over) is refused or
left out.  tests/unit/test_wsgi_environ.py compares the environ with eventlet's; the
HTTP integration tests (hostile input, slow clients, fuzzing, the SDKs) cover the rest.

What it must not do: decide anything about the request (framing is IngestProtocol's,
answers are the app's), or keep per-request state beyond the request.
"""
import time
import traceback
from urllib.parse import unquote

import eventlet
import eventlet.wsgi

class _Replay:
    """A header reader that gives back lines already read before reading on."""

    def __init__(self, lines, fp):
        self.lines = list(lines)
        self.fp = fp

    def readline(self, size=-1):
        if self.lines:
            return self.lines.pop(0)
        return self.fp.readline(size)


def build_environ(protocol):
    """The WSGI environ eventlet.wsgi.HttpProtocol.get_environ builds (eventlet 0.41), with
    what cannot change during a connection computed once per connection.

    PERF: eventlet asks the kernel for the socket's own address (getsockname) and builds
    the server's part of the environ again for every request; both are per connection.
    tests/unit/test_wsgi_environ.py checks this against eventlet's own method."""
    base = protocol.__dict__.get("_environ_base")
    if base is None:
        base = protocol.server.get_environ()
        server_host, server_port = eventlet.wsgi.addr_to_host_port(
            protocol.request.getsockname())
        client_host, client_port = eventlet.wsgi.addr_to_host_port(protocol.client_address)
        base.update(SCRIPT_NAME="", SERVER_PROTOCOL="HTTP/1.0", SERVER_NAME=server_host,
                    SERVER_PORT=str(server_port), REMOTE_ADDR=client_host,
                    REMOTE_PORT=str(client_port), GATEWAY_INTERFACE="CGI/1.1")
        protocol._environ_base = base
    env = dict(base)
    env["REQUEST_METHOD"] = protocol.command
    path, sep, query = protocol.path.partition("?")
    env["RAW_PATH_INFO"] = path
    env["PATH_INFO"] = unquote(path, encoding="latin1") if "%" in path else path
    if sep:
        env["QUERY_STRING"] = query
    headers = protocol.headers
    content_type = headers.get("content-type")
    env["CONTENT_TYPE"] = headers.get_content_type() if content_type is None else content_type
    length = headers.get("content-length")
    if length:
        env["CONTENT_LENGTH"] = length
    env["headers_raw"] = raw = tuple((k, v.strip(" \t\n\r")) for k, v in headers._headers)
    for name, value in raw:
        if "_" in name:
            continue          # eventlet drops names with underscores (never HTTP_ confusion)
        key = name.replace("-", "_").upper()
        if key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            continue
        key = "HTTP_" + key
        env[key] = env[key] + "," + value if key in env else value
    _add_input(protocol, env, length)
    return env


def _add_input(protocol, env, length):
    """wsgi.input (eventlet's Input, with 100-continue and chunked bodies) and the rest of
    eventlet's per-request keys."""
    if env.get("HTTP_EXPECT", "").lower() == "100-continue":
        wfile, wfile_line = protocol.wfile, b"HTTP/1.1 100 Continue\r\n"
    else:
        wfile = wfile_line = None
    chunked = env.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked"
    if not chunked and length is None:
        length = "0"          # RFC 9112 6.3: no length and not chunked means no body
    env["wsgi.input"] = env["eventlet.input"] = eventlet.wsgi.Input(
        protocol.rfile, length, protocol.connection, wfile=wfile, wfile_line=wfile_line,
        chunked_input=chunked)
    env["eventlet.posthooks"] = []

    def set_idle():
        protocol.conn_state[2] = eventlet.wsgi.STATE_IDLE
    env["eventlet.set_idle"] = set_idle


class _HttpDate:
    """The Date header's value, formatted once a second.

    PERF: eventlet formats it (time.gmtime and a %-format) for every answer."""

    def __init__(self, clock=time.time):
        self.clock = clock
        self._second = None
        self._value = None

    def __call__(self):
        second = int(self.clock())
        if second != self._second:
            self._value = eventlet.wsgi.format_date_time(second)
            self._second = second
        return self._value


http_date = _HttpDate()


def _no_write(data):
    raise RuntimeError("the worker's app answers with a body list, never write()")


def respond(protocol):
    """Run the app on protocol.environ and write its answer (eventlet's
    handle_one_response for an app whose answers are complete bodies).

    PERF: eventlet builds two closures and six one-item lists per request, encodes each
    header line separately, lower-cases every header name twice and goes through a
    green-thread-local flag; here the status line, headers and body are joined once."""
    environ = protocol.environ
    request_input = environ["eventlet.input"]
    sent = request_input.headers_sent = []     # Input sends 100 Continue only before this
    answer = []

    def start_response(status, headers, exc_info=None):
        if exc_info and sent:
            raise exc_info[1].with_traceback(exc_info[2])
        answer[:] = (status, headers)
        return _no_write

    try:
        result = protocol.application(environ, start_response)
        body = result[0] if len(result) == 1 else b"".join(result)
        status, headers = answer
        if request_input.should_send_hundred_continue:
            # A complete answer and the body never asked for: say the connection closes
            # (the client may or may not send the body now).
            protocol.close_connection = 1
    except (Exception, eventlet.Timeout):
        protocol.close_connection = 1
        protocol.server.log.info(traceback.format_exc())
        status, headers, body = ("500 Internal Server Error",
                                 [("Content-type", "text/plain"), ("Content-length", "0")], b"")
    _write(protocol, status, headers, body, request_input.wfile is not None)
    sent.append(1)
    _finish(protocol, request_input)


def _write(protocol, status, headers, body, after_continue=False):
    """Status line, the app's headers, Date and Connection, body: one write.
    `after_continue`: the request asked for a 100 Continue, which goes through the
    buffered writer; that may still hold part of it (a flush that timed out, and the
    flag saying it was sent not set): the answer follows it there."""
    lines = ["%s %s" % (protocol.protocol_version, status)]
    lines += ["%s: %s" % pair for pair in headers]
    lines.append("Date: " + http_date())
    server = protocol.server
    client_conn = protocol.headers.get("Connection", "").lower()
    if protocol.close_connection == 0 and server.keepalive and (
            client_conn == "keep-alive" or (protocol.request_version == "HTTP/1.1"
                                            and client_conn != "close")):
        protocol.close_connection = 0
        if client_conn == "keep-alive":      # only to clients that asked (HTTP/1.0)
            lines.append("Connection: keep-alive")
            timeout = int(server.keepalive or 0)
            if not isinstance(server.keepalive, bool) and timeout:
                lines.append("Keep-Alive: timeout=%d" % timeout)
    else:
        protocol.close_connection = 1
        lines.append("Connection: close")
    lines.append("\r\n")
    data = "\r\n".join(lines).encode("latin-1") + body
    if after_continue:
        protocol.wfile.write(data)
        protocol.wfile.flush()
    else:
        send_answer(protocol.connection, data)


def send_answer(conn, data):
    """All of `data` on the green socket `conn`: straight to the kernel socket under it
    while it takes the bytes, through the green socket (which waits for room) for what
    is left.

    PERF: the connection's buffered writer, socket.SocketIO and GreenSocket.send are four
    Python calls per answer around one send().  The answers written to that writer
    instead (eventlet's and the parser's refusals) close the connection, and an answer
    after a 100 Continue goes through it (_write)."""
    try:
        sent = conn.fd.send(data)
    except BlockingIOError:
        sent = 0
    if sent < len(data):
        conn.sendall(data[sent:])


def _finish(protocol, request_input):
    """What eventlet does after an answer: close rather than guess about a body the
    client may still send after a skipped 100 Continue; read and drop an unread body on
    a connection that stays open; run posthooks."""
    if request_input.should_send_hundred_continue:
        protocol.close_connection = 1
    if request_input.chunked_input or \
            request_input.position < (request_input.content_length or 0):
        if protocol.close_connection == 0:
            try:
                # Through wsgi.input: the body's deadline (deadline_io.DeadlineInput)
                # holds for what is left of it too, so a client trickling the rest does
                # not keep the connection.
                protocol.environ["wsgi.input"].discard()
            except (eventlet.wsgi.ChunkReadError, OSError) as exc:   # TimeoutError too
                protocol.close_connection = 1
                protocol.server.log.error("error while discarding request body: client=%s"
                                          " error=%s" % (protocol.client_address, exc))
    for hook, args, kwargs in protocol.environ["eventlet.posthooks"]:
        hook(protocol.environ, *args, **kwargs)
