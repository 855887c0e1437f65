"""The reading side of a worker's connection: deadlines for what a client sends.

    DeadlineReader   the raw stream under the connection's buffered reader: each recv
                     bounded by the deadline of the request line, header block or body
                     being read, or by the keep-alive wait before a request line
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


class DeadlinePassed(TimeoutError):
    """The header block or body being read did not arrive within its deadline."""


class DeadlineReader(io.RawIOBase):
    """The raw stream under a connection's buffered reader (protocol.rfile): each recv
    bounded by the socket's timeout and, while `deadline` (time.monotonic()) is set, by
    what is left of it; past it, DeadlinePassed.

    PERF: the header block and the body each have a deadline.  An eventlet.Timeout for
    each (a hub timer made and cancelled) cost ~19,000 instructions; without them a
    single-event request runs 7 % fewer in the whole worker.  A deadline here is an
    attribute, looked at only when a recv is needed, and most requests need none after
    their request line."""

    def __init__(self, sock):
        self.sock = sock
        self.deadline = None
        self.idle_timeout = None     # while a request line is awaited: the keep-alive wait
        # Once a request line's first bytes came, the rest of it must come within this
        # (the header block's budget, None for none) instead of a keep-alive wait per read.
        self.line_budget = None
        # PERF: the kernel socket under eventlet's green one, read directly while there is
        # data (GreenSocket.recv_into and its retry loop are two Python calls per read).
        fd = getattr(sock, "fd", None)
        self._recv_now = fd.recv_into if fd is not None else None

    def readable(self):
        return True

    def fileno(self):
        return self.sock.fileno()

    def readinto(self, buf):
        deadline = self.deadline
        if deadline is None:
            recv_now = self._recv_now
            if recv_now is None:     # no kernel socket under it (the unit tests' fakes)
                return self.sock.recv_into(buf)
            sock = self.sock
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
                    if n and self.idle_timeout is not None and self.line_budget:
                        self._line_begun()
                    return n
                # Nothing yet: wait as GreenSocket.recv_into does (a close from another
                # green thread ends the read), for the keep-alive wait or the socket's
                # timeout.
                idle = self.idle_timeout
                try:
                    sock._trampoline(sock.fd, read=True,
                                     timeout=sock.gettimeout() if idle is None else idle,
                                     timeout_exc=socket.timeout("timed out"))
                except IOClosed:
                    raise EOFError() from None
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlinePassed()
        sock = self.sock
        per_read = sock.gettimeout()
        if per_read is not None and per_read < left:
            return sock.recv_into(buf)     # the per-read timeout comes first
        sock.settimeout(left)
        try:
            return sock.recv_into(buf)
        except socket.timeout:
            raise DeadlinePassed() from None
        finally:
            sock.settimeout(per_read)

    def _line_begun(self):
        """A request line's first bytes came in: a client sending the rest a byte per
        keep-alive wait would hold its connection for hours, so the rest of the line
        must come within line_budget (past it, DeadlinePassed: the connection is closed
        as after a keep-alive timeout)."""
        self.idle_timeout = None
        self.deadline = time.monotonic() + self.line_budget


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
