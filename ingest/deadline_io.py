"""The reading side of a worker's connection: deadlines for what a client sends.

    DeadlineReader   the raw stream under the connection's buffered reader: each wait
                     for data bounded by the deadline of the request line, header block
                     or body being read, or by the keep-alive wait before a request line
    DeadlineInput    wsgi.input with one deadline for the whole body
    DeadlinePassed   what a read past its deadline raises

What it must not do: let a client hold a connection by sending slowly (a byte per read
timeout, or per keep-alive wait), or cost a timer per request (PERF in DeadlineReader).
With ingest/wsgi_server.py, which uses it, one of the places that touch eventlet.
"""
import io
import socket
import time

from eventlet.greenio.base import SOCKET_BLOCKING, SOCKET_CLOSED
from eventlet.hubs import IOClosed
from eventlet.support import get_errno


# DeadlineReader.line_state: no request line is being read; one is, none of it has come
# yet (the keep-alive wait); some of it has come.
LINE_NONE, LINE_AWAITED, LINE_BEGUN = 0, 1, 2


class DeadlinePassed(TimeoutError):
    """The request line, header block or body being read did not arrive within its
    deadline."""


class DeadlineReader(io.RawIOBase):
    """The raw stream under a connection's buffered reader (protocol.rfile): what the
    kernel socket has, at once; when it has nothing, a wait bounded by the keep-alive
    wait or the socket's timeout and, while `deadline` (time.monotonic()) is set, by
    what is left of it; past it, DeadlinePassed.

    PERF: the request line, the header block and the body each have a deadline.  An
    eventlet.Timeout for each (a hub timer made and cancelled) cost ~19,000
    instructions; without them a single-event request runs 7 % fewer in the whole
    worker.  A deadline here is an attribute, looked at only by a read under it, and
    most requests need none after their request line."""

    def __init__(self, sock):
        self.sock = sock
        self.deadline = None
        self.idle_timeout = None     # while a request line is awaited: the keep-alive wait
        # Where the request line being read is (LINE_*).  Once its first bytes have come,
        # the rest must come within line_budget (the header block's budget; None for
        # none), not a keep-alive wait or a read timeout per read.
        self.line_state = LINE_NONE
        self.line_budget = None
        # PERF: the kernel socket under eventlet's green one, read directly while there is
        # data (GreenSocket.recv_into and its retry loop are two Python calls per read).
        self._recv_now = sock.fd.recv_into

    def readable(self):
        return True

    def fileno(self):
        return self.sock.fileno()

    def readinto(self, buf):
        deadline = self.deadline
        if deadline is None and self.line_state == LINE_BEGUN and self.line_budget:
            deadline = self._line_deadline()      # more of a begun line is wanted
        if deadline is not None and deadline <= time.monotonic():
            raise DeadlinePassed()
        recv_now = self._recv_now
        while True:
            try:
                n = recv_now(buf)
            except BlockingIOError:
                pass
            except OSError as e:
                # As GreenSocket.recv_into: a reset or shut socket is the end of it,
                # ENOTCONN waits like EAGAIN, anything else is raised.
                err = get_errno(e)
                if err in SOCKET_CLOSED:
                    return 0
                if err not in SOCKET_BLOCKING:
                    raise
            else:
                if n and self.line_state == LINE_AWAITED:
                    self.line_state = LINE_BEGUN
                return n
            self._wait(deadline)

    def _wait(self, deadline):
        """Until the socket has data, waiting as GreenSocket.recv_into does (a close
        from another green thread ends the read: EOFError): for the keep-alive wait if
        one is set, else the socket's timeout (socket.timeout past it), either cut to
        what is left of `deadline` (DeadlinePassed past it).

        PERF: a read with a deadline used to set the socket's timeout to what was left,
        read through the green socket and set it back: a body's every read paid that,
        even with its bytes already there.  Now only a wait looks at the deadline."""
        sock = self.sock
        timeout = self.idle_timeout
        if timeout is None:
            timeout = sock.gettimeout()
        expired = socket.timeout("timed out")
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlinePassed()
            if timeout is None or left <= timeout:
                timeout, expired = left, DeadlinePassed()
        try:
            sock._trampoline(sock.fd, read=True, timeout=timeout, timeout_exc=expired)
        except IOClosed:
            raise EOFError() from None

    def _line_deadline(self):
        """A request line has begun and more of it is wanted: a client sending the rest
        a byte per keep-alive wait (or per read timeout) would hold its connection for
        hours, so the rest must come within line_budget (past it, DeadlinePassed: the
        connection is closed as after a keep-alive timeout).

        Set at the line's second read, not its first: most lines come whole in one read
        and need no deadline (no clock read for them)."""
        self.idle_timeout = None
        self.deadline = deadline = time.monotonic() + self.line_budget
        return deadline


class DeadlineInput:
    """wsgi.input with one deadline for the whole body.

    The socket timeout bounds each read only, so a client sending a byte every few
    seconds would hold its request (and its connection) for as long as it likes; here
    the body as a whole must arrive within `seconds` of the headers, else TimeoutError
    (the app answers 408) and the connection is closed.  The connection's
    DeadlineReader holds the deadline while a read is under way."""

    def __init__(self, raw, seconds, protocol):
        self.raw = raw
        self.deadline = time.monotonic() + seconds
        self.protocol = protocol

    def _within(self, method, *args):
        reader = self.protocol.reader
        reader.deadline = self.deadline
        try:
            return method(*args)
        except DeadlinePassed:
            self.protocol.close_after_answer()
            raise TimeoutError("request body not received in time") from None
        except OSError:
            self.protocol.close_after_answer()   # what is left of the body is unknown
            raise
        finally:
            reader.deadline = None

    def read(self, *args):
        return self._within(self.raw.read, *args)

    def readline(self, *args):
        return self._within(self.raw.readline, *args)

    def discard(self, *args):
        """Read and drop what is left of the body (after an answer that did not read
        it all), within the same deadline."""
        return self._within(self.raw.discard, *args)

    def __iter__(self):
        return iter(self.read, b"")
