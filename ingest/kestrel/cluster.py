"""The client's view of a Kestrel cluster: servers, their health, and one connection.

What it is for: `ServerSet` decides which servers to try and in which order and keeps a
failed server out for `retry_ms`; `Server` holds one server's address, idle connections
and failure counts (read by ingest/metrics.py); `Connection` is one socket with its
receive buffer, which reads whole reply lines and values.

What it must not do: import eventlet (the caller monkey-patches `socket`), know about
queues or commands beyond reading reply lines, or leave a socket usable after an error:
any socket or protocol error closes the connection before it is raised, so a half-read
reply never reaches the next command.
"""
import collections
import random
import socket
import time

from ingest.kestrel.errors import KestrelConnectionError, KestrelProtocolError, KestrelTimeout
from ingest.kestrel.protocol import CRLF, split_reply_lines

RECV_BYTES = 65536
MAX_RECV_BYTES = 1 << 20


# ---- servers and their health -----------------------------------------------------------

class Server:
    """One Kestrel server: its address, its idle connections and its back-off deadline."""

    __slots__ = ("host", "port", "address", "idle", "down_until", "failures", "errors")

    def __init__(self, host, port):
        self.host, self.port = host, port
        # Spelled as parse_servers reads it: an IPv6 host goes in brackets.
        self.address = ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)
        self.idle = collections.deque()
        self.down_until = 0.0
        self.failures = 0       # consecutive, reset when the server answers again
        self.errors = 0         # cumulative, exported as ingest_kestrel_errors_total

    def __repr__(self):
        return "<kestrel %s>" % self.address


class ServerSet:
    """Which servers to try, in which order; skips a failed server for `retry_ms`.

    Pure apart from the injected clock and random start, so the unit tests drive it.
    Each call to `order()` starts one server further on, which spreads writes (and the
    first server a read asks) evenly over the healthy servers.
    """

    def __init__(self, addresses, retry_ms=1000, clock=time.monotonic, start=None):
        self.servers = [Server(h, p) for h, p in addresses]
        self.retry_s = retry_ms / 1000.0
        self.clock = clock
        self._next = random.randrange(len(self.servers)) if start is None else start

    def healthy(self, server, now=None):
        return (self.clock() if now is None else now) >= server.down_until

    def order(self):
        """Healthy servers, starting one further than the previous call."""
        servers = self.servers
        n = len(servers)
        i = self._next % n
        self._next = i + 1
        now = self.clock()
        return [s for s in servers[i:] + servers[:i] if now >= s.down_until]

    def mark_down(self, server):
        """Skip `server` for retry_ms; its idle connections are presumed dead too."""
        server.down_until = self.clock() + self.retry_s
        server.failures += 1
        server.errors += 1
        drop_idle(server)

    def mark_up(self, server):
        if server.failures:
            server.failures = 0
            server.down_until = 0.0


def drop_idle(server):
    """Close every idle connection of `server` (another thread may be popping too)."""
    while True:
        try:
            server.idle.pop().close()
        except IndexError:
            return


# ---- one connection ---------------------------------------------------------------------

class Connection:
    """A socket plus its receive buffer.  Any error closes it before re-raising."""

    __slots__ = ("server", "sock", "buf", "reused")

    def __init__(self, server, connect_timeout):
        self.server = server
        self.buf = b""
        self.reused = False
        try:
            self.sock = socket.create_connection((server.host, server.port), connect_timeout)
            # Replies are awaited before the next request, so Nagle only adds latency.
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as e:
            raise KestrelConnectionError("%s: connect: %s" % (server.address, e)) from None

    def close(self):
        sock, self.sock = self.sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    @property
    def closed(self):
        return self.sock is None

    def send(self, data, timeout):
        try:
            self.sock.settimeout(timeout)
            self.sock.sendall(data)
        except socket.timeout:
            self.close()
            raise KestrelTimeout("%s: send timed out" % self.server.address) from None
        except OSError as e:
            self.close()
            raise KestrelConnectionError("%s: send: %s" % (self.server.address, e)) from None

    def _recv(self, size, partial=()):
        """One recv; EOF, errors and timeouts close the connection.  `partial`: the reply
        lines already read, handed to the error."""
        try:
            chunk = self.sock.recv(size)
        except socket.timeout:
            self.close()
            raise KestrelTimeout("%s: no reply in time" % self.server.address,
                                 partial) from None
        except OSError as e:
            self.close()
            raise KestrelConnectionError("%s: recv: %s" % (self.server.address, e),
                                         partial) from None
        if not chunk:
            self.close()
            raise KestrelConnectionError("%s: connection closed by server"
                                         % self.server.address, partial)
        return chunk

    def fill(self, partial=()):
        self.buf += self._recv(RECV_BYTES, partial)

    def readline(self):
        while True:
            i = self.buf.find(CRLF)
            if i >= 0:
                line, self.buf = self.buf[:i], self.buf[i + 2:]
                return line
            self.fill()

    def read_exact(self, n):
        have = len(self.buf)
        if have < n:
            # Big items: collect the chunks and join once (appending to the buffer would
            # copy it again for every chunk).
            parts = [self.buf]
            while have < n:
                chunk = self._recv(min(max(RECV_BYTES, n - have), MAX_RECV_BYTES))
                parts.append(chunk)
                have += len(chunk)
            self.buf = b"".join(parts)
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def read_lines(self, n, deadline=None):
        """Exactly n reply lines; on a failure, the error's `partial` holds those read.

        `deadline` (time.monotonic()) bounds the whole reply: the socket timeout alone
        is per recv, so a server trickling replies could hold the caller indefinitely."""
        lines = []
        while True:
            got, self.buf = split_reply_lines(self.buf, n - len(lines))
            lines.extend(got)
            if len(lines) == n:
                return lines
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.close()
                    raise KestrelTimeout("%s: reply not complete in time"
                                         % self.server.address, lines)
                self.sock.settimeout(left)
            self.fill(lines)

    def expect_clean(self):
        """After a full reply nothing else may be buffered; otherwise the stream is lost."""
        if self.buf:
            self.close()
            raise KestrelProtocolError("%s: unexpected bytes after reply" % self.server.address)
