"""The worker's HTTP seam on eventlet: what `ingest serve` changes in eventlet's server.

    IngestProtocol   eventlet's HTTP/1.1 handler with strict framing, well-formed errors,
                     a whole-header deadline and closing (not answering) while draining
    PatientListener  the listening socket, with an accept() that survives EMFILE/ENFILE

What it must not do: hold application logic (that is ingest/http/, plain WSGI), or let a
client's malformed or slow request reach the app.  With ingest/worker.py (the bootstrap),
ingest/wsgi_exchange.py, ingest/deadline_io.py (its reading side), ingest/green.py and
ingest/queue/ it is one of the places that touch eventlet.
"""
import errno
import io
import logging
import resource
import socket
import time

import eventlet
import eventlet.wsgi
from eventlet.support import get_errno

from ingest import errors
from ingest.deadline_io import (LINE_AWAITED, LINE_NONE, DeadlineInput, DeadlinePassed,
                                DeadlineReader)
from ingest.http.answers import json_body
from ingest.http.headers import parse_plain
from ingest.wsgi_exchange import _Replay, build_environ, respond

log = logging.getLogger("ingest.worker")


# The body of every answer the HTTP parser gives itself (the catalogue's wording).
_ERROR_BODY = json_body({"status": 0, "error": errors.message("malformed_http")})


def _bare_cr(lines):
    """True when a header line holds a CR that does not end it.

    Counted over the joined block at C speed: each line ends at its first LF, so every
    CR followed by an LF ends a line, and any other CR is a lone one."""
    block = b"".join(lines)
    return block.count(b"\r") != block.count(b"\r\n")


class IngestProtocol(eventlet.wsgi.HttpProtocol):
    """eventlet's HTTP/1.1 handler with stricter framing and well-formed errors.

    - Errors the standard library's parser raises (bad request line, bad version, too
      many headers) get a fixed JSON body with a real status line, never the request
      echoed back in an HTML page; an unparsable version is answered as HTTP/1.0 (the
      default of HTTP/0.9 wrote no status line at all).
    - A header block the parser could not fully read (a malformed line makes it stop
      early and silently drop the headers after it, including Content-Length) is
      refused: otherwise the rest is read as a second request (request smuggling).
    - Content-Length must be plain digits and appear once; Transfer-Encoding must be one
      line that says `chunked`, and only in an HTTP/1.1 request; no header line may
      hold a lone CR.
    - A begun request line, and then the header block, must each arrive within the
      read timeout as a whole (slow-loris).
    """

    default_request_version = "HTTP/1.0"

    def setup(self):
        """The connection and its buffered reader and writer, as eventlet sets them up,
        except that the reader reads through a DeadlineReader."""
        conn = self.connection = self.request
        try:
            # Acknowledge at once instead of waiting to piggyback on the answer.
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, True)
        except (OSError, AttributeError):
            pass
        self.reader = DeadlineReader(conn)
        self.reader.line_budget = self.server.socket_timeout
        self.rfile = io.BufferedReader(self.reader, io.DEFAULT_BUFFER_SIZE)
        self.wfile = conn.makefile("wb", self.wbufsize)

    def handle_one_request(self):
        """eventlet's HttpProtocol.handle_one_request (0.41.3), step for step and answer
        for answer, without its per-request wrappers (its refusal of a Content-Length
        beside a Transfer-Encoding is in _checked_framing, which has both at hand).

        PERF: eventlet sets the socket's timeout twice around every request line (the
        keep-alive wait, then the read timeout back) and reads the header lines through
        a Python wrapper (FileObjectForHeaders) that adds up their sizes.  Here the
        keep-alive wait is the reader's idle_timeout, looked at only when a read has to
        wait, and _parse_head checks the sizes as it reads; the standard parser's paths
        still read through eventlet's wrapper."""
        server = self.server
        if server.max_http_version:
            self.protocol_version = server.max_http_version
        self.raw_requestline = line = self._read_request_line()
        self.conn_state[2] = eventlet.wsgi.STATE_REQUEST
        if not line:
            self.close_connection = 1
            return
        if len(line) >= server.url_length_limit:
            self.wfile.write(eventlet.wsgi.RESPONSE_414)
            self.close_connection = 1
            return
        try:
            if not self.parse_request():
                return
        except eventlet.wsgi.HeaderLineTooLong:
            self.wfile.write(b"HTTP/1.0 400 Header Line Too Long\r\n"
                             b"Connection: close\r\nContent-length: 0\r\n\r\n")
            self.close_connection = 1
            return
        except eventlet.wsgi.HeadersTooLarge:
            self.wfile.write(b"HTTP/1.0 400 Headers Too Large\r\n"
                             b"Connection: close\r\nContent-length: 0\r\n\r\n")
            self.close_connection = 1
            return
        self.environ = self.get_environ()
        self.application = server.app
        try:
            server.outstanding_requests += 1
            try:
                self.handle_one_response()
            except OSError as e:
                if get_errno(e) not in eventlet.wsgi.BROKEN_SOCK:
                    raise
        finally:
            server.outstanding_requests -= 1

    def _read_request_line(self):
        """The next request line, waiting for it up to the keep-alive timeout (eventlet's
        method, with that timeout given to the reader instead of the socket); once it has
        begun, the rest of it within the read timeout as a whole (DeadlineReader)."""
        if self.rfile.closed:
            self.close_connection = 1
            return ""
        server = self.server
        keepalive = server.keepalive
        reader = self.reader
        if keepalive and not isinstance(keepalive, bool):
            reader.idle_timeout = keepalive
        reader.line_state = LINE_AWAITED
        try:
            return self.rfile.readline(server.url_length_limit)
        except OSError as e:
            last_errno = get_errno(e)
            if last_errno in eventlet.wsgi.BROKEN_SOCK:
                server.log.debug("(%s) connection reset by peer %r"
                                 % (server.pid, self.client_address))
            elif last_errno not in eventlet.wsgi.BAD_SOCK:
                raise
        finally:
            reader.idle_timeout = None
            reader.line_state = LINE_NONE
            reader.deadline = None
        return ""

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
        reader = self.reader
        if budget:
            reader.deadline = time.monotonic() + budget
        try:
            if not self._parse_head():
                return False
        except DeadlinePassed:
            self.close_connection = 1      # too slow to deserve an answer
            return False
        finally:
            reader.deadline = None
        return self._checked_framing()

    def _parse_head(self):
        """The request line and headers: the plain fast path (PERF below), else the
        standard library's parser on the same bytes.

        PERF: http.server hands every header block to the email package: about a
        quarter of a bare eventlet hello-world's CPU.  A request line `METHOD PATH
        HTTP/1.x` with plain header lines (ingest/http/headers.py) is read here into the
        same values; anything else is replayed into the standard parser unchanged."""
        requestline = self.raw_requestline.decode("iso-8859-1").rstrip("\r\n")
        words = requestline.split()
        if len(words) != 3:
            return self._reparse([], 0)        # refused there, or HTTP/0.9
        lines = []
        readline = self.rfile.readline
        # eventlet's limits (FileObjectForHeaders): each line, and the block as a whole.
        line_limit = eventlet.wsgi.MAX_HEADER_LINE
        total = 0
        while True:
            line = readline(65537)
            if len(line) >= line_limit:
                raise eventlet.wsgi.HeaderLineTooLong()
            total += len(line)
            if total > eventlet.wsgi.MAX_TOTAL_HEADER_SIZE:
                raise eventlet.wsgi.HeadersTooLarge()
            if line in (b"\r\n", b"\n", b""):
                break
            lines.append(line)
            if len(lines) >= 100 or len(line) > 65536:
                return self._reparse(lines, total)     # the standard parser's limits decide
        fast = (words[2] in _FAST_VERSIONS and words[1][:2] != "//"
                and self.protocol_version == "HTTP/1.1")
        headers = parse_plain(lines) if fast else None
        if headers is None or line == b"":
            # A plain block (parse_plain) holds no lone CR; any other may.  The email
            # parser ends a header line at one, so `X: a<CR>Transfer-Encoding: chunked`
            # would frame the body for this worker but not for a proxy that keeps the
            # line whole (RFC 9112 2.2: refuse it).
            if _bare_cr(lines):
                self.command = None
                self.send_error(400)
                return False
            return self._reparse(lines + [line], total)
        self.command, self.path, self.request_version = words
        self.requestline = requestline
        self.headers = headers
        self.close_connection = words[2] != "HTTP/1.1"
        conntype = headers.get("Connection", "").lower()
        if conntype == "close":
            self.close_connection = True
        elif conntype == "keep-alive":
            self.close_connection = False
        if words[2] == "HTTP/1.1" and headers.get("Expect", "").lower() == "100-continue":
            return self.handle_expect_100()
        return True

    def _reparse(self, lines, total):
        """Hand the bytes already read (`total` of them) to the standard library's
        parser, as if unread; what it reads on goes through eventlet's size limits."""
        real = self.rfile
        limited = eventlet.wsgi.FileObjectForHeaders(real)
        limited.total_header_size = total
        self.rfile = _Replay(lines, limited)
        try:
            return super().parse_request()
        finally:
            self.rfile = real

    def _checked_framing(self):
        headers = self.headers
        if headers.defects:
            self.send_error(400)
            return False
        lengths = headers.get_all("Content-Length") or ()
        if len(lengths) > 1 or (lengths and not _plain_digits(lengths[0].strip())):
            self.send_error(400)
            return False
        # Exactly one Transfer-Encoding line, and it says chunked: repeated lines are
        # joined ("chunked,chunked") into the environ, which the input stream would not
        # take for chunked, leaving the body to be read as the next request.
        # The value is trimmed as the environ trims it (build_environ: spaces, tabs, CR,
        # LF only): str.strip() would also take a trailing NBSP or form feed away here
        # while the input stream saw "chunked\xa0", not chunked, and read the body as
        # the next request.
        # Only HTTP/1.1 has chunked framing (RFC 9112 6.1: a Transfer-Encoding in an
        # HTTP/1.0 message is faulty framing); the standard parser also takes HTTP/1.00
        # or HTTP/01.0 for 1.0, so the version must be exactly HTTP/1.1.
        codings = headers.get_all("Transfer-Encoding") or ()
        if len(codings) > 1 or (codings and (
                codings[0].strip(" \t\r\n").lower() != "chunked"
                or self.request_version != "HTTP/1.1")):
            self.send_error(400)
            return False
        if self.server.app.state.draining:
            # A request read after SIGTERM, on a kept-alive connection: close without an
            # answer.  Nothing was stored, so nginx sends it to another worker
            # (proxy_next_upstream error ... non_idempotent); a 503 would reach the client
            # as a failure.  Requests already in the app finish and are answered.
            self.close_connection = 1
            return False
        if lengths and codings:
            # eventlet's own answer (its handle_one_request checked this after parsing).
            self.wfile.write(_BOTH_FRAMINGS)
            self.close_connection = 1
            return False
        return True

    def get_environ(self):
        """eventlet's environ (build_environ), with the whole-body deadline on wsgi.input
        and the hook the app calls to close the connection instead of reading an unread
        body."""
        env = build_environ(self)
        budget = env.get("ingest.body_timeout_s")
        if budget and ("CONTENT_LENGTH" in env or "HTTP_TRANSFER_ENCODING" in env):
            env["wsgi.input"] = DeadlineInput(env["wsgi.input"], budget, self)
        env["ingest.close"] = self.close_after_answer
        return env

    def close_after_answer(self):
        self.close_connection = 1

    def handle_one_response(self):
        """The app's answer, written by wsgi_exchange.respond (eventlet's own method when
        access logging through eventlet is on)."""
        if self.server.log_output:
            return super().handle_one_response()
        return respond(self)


_FAST_VERSIONS = ("HTTP/1.1", "HTTP/1.0")


def _plain_digits(value):
    """True for ASCII digits only: str.isdigit() also takes superscripts (a Content-Length
    of '\xb2', which int() refuses)."""
    return value.isascii() and value.isdigit()


# eventlet's answer to a request with both a Content-Length and a Transfer-Encoding.
_BOTH_MESSAGE = b"Content-Length and Transfer-Encoding are not allowed together\n"
_BOTH_FRAMINGS = (b"HTTP/1.0 400 Bad Request\r\nConnection: close\r\nContent-Length: %d\r\n"
                  b"\r\n%s" % (len(_BOTH_MESSAGE), _BOTH_MESSAGE))


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
