"""A raw memcache-protocol connection to a Kestrel-compatible queue server, for tests.

Bytes go out exactly as the test writes them and replies are read line by line (or by
exact length for item data), with a read buffer and a socket timeout, so a test can
assert on every reply byte, including the ones a client library would hide (CLIENT_ERROR,
a closed connection).  It is not a client: no retries, no pooling, no recovery after
an error; ingest.kestrel is the client.  It connects only to the server it is given
(anything with `host` and `port`, such as testkit.procs.QueueServer).
"""
import socket


class Wire:
    """A raw memcache-protocol connection with a read buffer and a read timeout."""

    def __init__(self, server, timeout=5.0):
        self.sock = socket.create_connection((server.host, server.port), timeout=timeout)
        self.buf = b""

    def close(self):
        self.sock.close()

    def send(self, data):
        self.sock.sendall(data)

    def _fill(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("server closed the connection")
        self.buf += chunk

    def line(self):
        while b"\r\n" not in self.buf:
            self._fill()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def exact(self, n):
        while len(self.buf) < n:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def cmd(self, line):
        self.send(line + b"\r\n")
        return self.line()

    def set(self, queue, data, expiry=0, flags=0):
        self.send(b"set %s %d %d %d\r\n%s\r\n" % (queue.encode(), flags, expiry, len(data),
                                                   data))
        return self.line()

    def value(self):
        """Read one get reply: the item bytes, or None for END."""
        line = self.line()
        if line == b"END":
            return None
        parts = line.split(b" ")
        assert parts[0] == b"VALUE" and parts[2] == b"0", line
        data = self.exact(int(parts[3]))
        assert self.exact(2) == b"\r\n"
        assert self.line() == b"END"
        return data

    def get(self, key):
        self.send(b"get %s\r\n" % key.encode())
        return self.value()

    def value_line(self, key):
        """The VALUE line of `get key` (to check the name it carries)."""
        self.send(b"get %s\r\n" % key.encode())
        line = self.line()
        n = int(line.split(b" ")[3])
        self.exact(n + 2)
        assert self.line() == b"END"
        return line

    def closed_by_server(self):
        """True when the server has closed this connection (EOF within the timeout)."""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def stats(self):
        self.send(b"stats\r\n")
        out = {}
        while True:
            line = self.line()
            if line == b"END":
                return out
            _, key, value = line.decode().split(" ", 2)
            out[key] = value
