"""Cluster-aware Kestrel client (pykestrel's method names, Python 3, green-thread safe).

What it is for: talking Kestrel's memcache protocol to a set of share-nothing servers
(the bundled `ingest queue`, real Kestrel 2.x or Darner).  Writes go to one healthy
server and fail over to the next; a failed server is skipped for `retry_ms`.  Reads
visit the servers in turn.  A reliable read (`next`) stays on the connection that
opened it until `next`/`finish`/`abort` closes it there.

What it must not do: import eventlet (the caller monkey-patches `socket`, which makes
every socket here green), share one socket between two users at the same time, return
a socket with a half-read reply to the pool, or report an item as stored without the
server's `STORED`.  Only commands that Kestrel 2.x and Darner both understand are sent
(lower-case `set`, `get` with `/open`, `/close`, `/abort`, `/peek`, `/t=`, `delete`,
`flush`, `flush_all`, `stats`, `version`).

All timeouts are in milliseconds.
"""
import collections
import random
import socket
import threading
import time

from ingest.kestrel.protocol import valid_queue_name

CRLF = b"\r\n"
STORED = b"STORED"
NOT_STORED = b"NOT_STORED"
END = b"END"
RECV_BYTES = 65536
MAX_RECV_BYTES = 1 << 20
# Blocking reads over several servers wait on one server at a time: at least Kestrel's
# 100 ms timer tick, at most 500 ms so an item arriving elsewhere waits that long at most.
MIN_SLICE_MS = 100
MAX_SLICE_MS = 500


class KestrelError(Exception):
    """Any failure reported by this client."""


class InvalidQueueName(KestrelError, ValueError):
    """The queue name would be refused by a Kestrel server (or breaks the framing)."""


class KestrelConnectionError(KestrelError):
    """Connecting, sending or receiving failed, or the server closed the connection."""


class KestrelTimeout(KestrelConnectionError):
    """No reply within the read timeout (the server may still act on the request)."""


class KestrelProtocolError(KestrelError):
    """The server sent something this client cannot parse."""


class KestrelServerError(KestrelError):
    """The server answered ERROR, CLIENT_ERROR or SERVER_ERROR."""

    def __init__(self, line):
        super().__init__(line)
        self.line = line

    @property
    def server_side(self):
        """SERVER_ERROR means the server refuses service now (read-only, quiescent...)."""
        return self.line.startswith("SERVER_ERROR")


class KestrelUnavailable(KestrelError):
    """No server took the items.  `remaining` lists the (queue, data) pairs never STORED."""

    def __init__(self, message, remaining=()):
        super().__init__(message)
        self.remaining = list(remaining)


FAILED = object()  # _read_one's answer for a server that failed


# ---- pure helpers (unit-tested without sockets) ----------------------------------------

def parse_servers(servers):
    """'h:p,h:p' or ['h:p', ...] -> [('h', p), ...]; raises ValueError on a bad entry."""
    if isinstance(servers, str):
        servers = servers.split(",")
    out = []
    for text in servers:
        text = text.strip()
        if not text:
            continue
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("Kestrel server must be host:port, got %r" % text)
        out.append((host.strip("[]"), int(port)))
    if not out:
        raise ValueError("at least one Kestrel server is needed")
    return out


def check_queue(queue):
    """The queue name as bytes, or InvalidQueueName."""
    if not isinstance(queue, str) or not valid_queue_name(queue):
        raise InvalidQueueName("invalid queue name %r" % (queue,))
    return queue.encode("utf-8")


def as_bytes(data):
    if isinstance(data, bytes):
        return data
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise TypeError("queue items are bytes or str, not %s" % type(data).__name__)


def get_command(queue, timeout=None, open_=False, close=False, abort=False, peek=False):
    """The `get` line for `queue` with Kestrel's slash options (timeout in ms)."""
    parts = [b"get ", check_queue(queue)]
    if close:
        parts.append(b"/close")
    if open_:
        parts.append(b"/open")
    if abort:
        parts.append(b"/abort")
    if peek:
        parts.append(b"/peek")
    if timeout:
        parts.append(b"/t=%d" % max(0, int(timeout)))
    parts.append(CRLF)
    return b"".join(parts)


def build_sets(pairs, expire=0):
    """One buffer holding a `set` per (queue, data) pair, in order.

    PERF: one b"".join over references to the items and cached per-queue prefixes (the
    name is validated once per batch): a 50 x 1 KiB batch builds in ~13 us, against ~70 us
    with one b"set %s 0 0 %d..." format per item that checks the name each time.
    """
    prefixes = {}
    parts = []
    append = parts.append
    tail = b" 0 %d " % int(expire)
    for queue, data in pairs:
        prefix = prefixes.get(queue)
        if prefix is None:
            prefix = prefixes[queue] = b"set " + check_queue(queue) + tail
        if type(data) is not bytes:
            data = as_bytes(data)
        append(prefix)
        append(b"%d\r\n" % len(data))
        append(data)
        append(CRLF)
    return b"".join(parts)


def count_stored(lines):
    """Indices (into the batch) whose reply line is STORED, and the first error line.

    `lines` are the complete reply lines received so far, one per item in order.
    NOT_STORED is a per-item refusal (queue full, item too large): the stream stays in
    sync.  Anything else ends the usable part of the stream.
    """
    stored = []
    for i, line in enumerate(lines):
        if line == STORED:
            stored.append(i)
        elif line != NOT_STORED:
            return stored, line
    return stored, None


def unstored(pairs, stored):
    """The pairs whose index is not in `stored` (the STORED replies), in order."""
    if not stored:
        return list(pairs)
    done = set(stored)
    return [p for i, p in enumerate(pairs) if i not in done]


def split_reply_lines(buf, n):
    """The first min(n, available) complete CRLF lines of `buf`, and the leftover bytes."""
    lines = buf.split(CRLF, n)
    if len(lines) > n:
        return lines[:n], lines[n]
    return lines[:-1], lines[-1]


def parse_value_header(line):
    """`VALUE <q> <flags> <len>` -> len; None for END; raises on anything else."""
    if line == END:
        return None
    parts = line.split(b" ")
    if parts[0] == b"VALUE" and len(parts) >= 4 and parts[3].isdigit():
        return int(parts[3])
    raise_reply(line)


def raise_reply(line):
    text = line.decode("utf-8", "replace")
    if text.startswith(("ERROR", "CLIENT_ERROR", "SERVER_ERROR")):
        raise KestrelServerError(text)
    raise KestrelProtocolError("unexpected reply %r" % text[:200])


def stat_value(text):
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


# Per-queue stat names of Kestrel 2.4, Darner and the bundled server, longest first so
# `queue_q_total_items` is read as (q, total_items) and not (q_total, items).
QUEUE_STATS = sorted((
    "items", "bytes", "total_items", "logsize", "expired_items", "mem_items", "mem_bytes",
    "age", "discarded", "waiters", "open_transactions", "transactions",
    "canceled_transactions", "total_flushes", "journal_rewrites", "journal_rotations",
    "children", "put_items", "put_bytes", "journal_size", "age_msec", "create_time",
), key=len, reverse=True)


def parse_stats(lines):
    """STAT lines -> {"server": {k: v}, "queues": {name: {stat: v}}}.

    Queue names may contain `_`, so `queue_<name>_<stat>` is ambiguous; each key is read
    with the queue name that the most keys agree on (ties: the longer stat name).
    """
    server, queued = {}, []
    for line in lines:
        parts = line.split(" ", 2)
        if len(parts) < 3 or parts[0] != "STAT":
            continue
        key, value = parts[1], stat_value(parts[2])
        if key.startswith("queue_"):
            queued.append((key[6:], value))
        else:
            server[key] = value
    candidates = [[(rest[:-len(s) - 1], s) for s in QUEUE_STATS
                   if rest.endswith("_" + s) and len(rest) > len(s) + 1]
                  for rest, _ in queued]
    votes = collections.Counter(name for cands in candidates for name, _ in cands)
    queues = {}
    for (rest, value), cands in zip(queued, candidates):
        if not cands:
            server["queue_" + rest] = value
            continue
        name, stat = max(cands, key=lambda c: (votes[c[0]], len(c[1])))
        queues.setdefault(name, {})[stat] = value
    return {"server": server, "queues": queues}


# ---- servers and their health -----------------------------------------------------------

class Server:
    """One Kestrel server: its address, its idle connections and its back-off deadline."""

    __slots__ = ("host", "port", "address", "idle", "down_until", "failures", "errors")

    def __init__(self, host, port):
        self.host, self.port = host, port
        self.address = "%s:%d" % (host, port)
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

    def _recv(self, size):
        """One recv; EOF, errors and timeouts close the connection."""
        try:
            chunk = self.sock.recv(size)
        except socket.timeout:
            self.close()
            raise KestrelTimeout("%s: no reply in time" % self.server.address) from None
        except OSError as e:
            self.close()
            raise KestrelConnectionError("%s: recv: %s" % (self.server.address, e)) from None
        if not chunk:
            self.close()
            raise KestrelConnectionError("%s: connection closed by server" % self.server.address)
        return chunk

    def fill(self):
        self.buf += self._recv(RECV_BYTES)

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
        """Exactly n reply lines; on a failure, `.partial` on the error holds those read.

        `deadline` (time.monotonic()) bounds the whole reply: the socket timeout alone
        is per recv, so a server trickling replies could hold the caller indefinitely."""
        lines = []
        while True:
            got, self.buf = split_reply_lines(self.buf, n - len(lines))
            lines.extend(got)
            if len(lines) == n:
                return lines
            try:
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self.close()
                        raise KestrelTimeout("%s: reply not complete in time" % self.server.address)
                    self.sock.settimeout(left)
                self.fill()
            except KestrelConnectionError as e:
                e.partial = lines
                raise

    def expect_clean(self):
        """After a full reply nothing else may be buffered; otherwise the stream is lost."""
        if self.buf:
            self.close()
            raise KestrelProtocolError("%s: unexpected bytes after reply" % self.server.address)


# ---- the client ---------------------------------------------------------------------------

class Client:
    """pykestrel-style client over a cluster of share-nothing Kestrel servers.

    `servers`: ["host:port", ...] or "host:port,host:port".  Times are milliseconds.
    `pool_size`: idle connections kept per server.  `clock` (monotonic seconds) is a test
    hook for the back-off and read deadlines.
    """

    def __init__(self, servers, connect_timeout_ms=500, timeout_ms=2000, retry_ms=1000,
                 pool_size=64, clock=time.monotonic):
        self.cluster = ServerSet(parse_servers(servers), retry_ms, clock)
        self.connect_timeout = connect_timeout_ms / 1000.0
        self.timeout_ms = timeout_ms
        self.timeout = timeout_ms / 1000.0
        self.pool_size = pool_size
        self.clock = clock
        # (thread ident, queue) -> the checked-out Connection holding that open read.
        self._open_reads = {}

    def __repr__(self):
        return "<kestrel.Client %s>" % ",".join(s.address for s in self.cluster.servers)

    @property
    def servers(self):
        return [s.address for s in self.cluster.servers]

    # -- connection pool --

    def _checkout(self, server):
        try:
            conn = server.idle.pop()
        except IndexError:
            return Connection(server, self.connect_timeout)
        conn.reused = True
        return conn

    def _checkin(self, conn):
        if conn.closed:
            return
        if conn.buf or len(conn.server.idle) >= self.pool_size:
            conn.close()
        else:
            conn.server.idle.append(conn)

    def _call(self, server, func, *args):
        """func(conn, *args) on a pooled connection to `server`, returned afterwards."""
        result, conn = self._use(server, func, *args)
        self._checkin(conn)
        return result

    def _use(self, server, func, *args):
        """func(conn, *args) on a connection checked out of `server`'s pool; returns
        (result, conn) with conn still checked out.

        A reused idle connection may have died with a restarted server; if it fails at
        once (reset or closed before any reply), the request is repeated on a fresh
        connection.  A timeout is not repeated: the server may be slow, not gone.
        """
        conn = self._checkout(server)
        try:
            try:
                result = func(conn, *args)
            except KestrelConnectionError as e:
                if not conn.reused or getattr(e, "partial", None) or \
                        isinstance(e, KestrelTimeout):
                    raise
                conn = Connection(server, self.connect_timeout)
                result = func(conn, *args)
        except BaseException:
            # Whatever interrupted us (error, green-thread kill, eventlet.Timeout), the
            # reply may be half-read: this socket must never be used again.
            conn.close()
            raise
        return result, conn

    # -- writes --

    def put_many(self, pairs):
        """Store every (queue, data) pair; None when all are STORED.

        PERF: the HTTP worker's hot path.  One buffer, one sendall, replies split from
        the receive buffer: about 2 us of client CPU per 1 KiB item in batches of 50 and
        1 us in batches of 500 (bench/kestrel_client_bench.py, loopback, kernel time
        included).

        All the `set`s go out in one write and one reply per item is read back.  On a
        server failure only the items not yet STORED go to the next healthy server.
        Raises KestrelUnavailable (with `.remaining`) when no server took them.
        """
        return self._put(pairs, 0)

    def add_many(self, queue, items, expire=0):
        """pykestrel-style: True when every item was STORED, False otherwise."""
        try:
            self._put([(queue, d) for d in items], expire)
        except KestrelUnavailable:
            return False
        return True

    def add(self, queue, data, expire=0):
        """Store one item (bytes, or str sent as UTF-8); True when STORED.

        `expire`: memcache exptime, 0 = never, < 1,000,000 = seconds from now, else an
        absolute Unix time in seconds (Darner ignores it).
        """
        return self.add_many(queue, [data], expire)

    def _put(self, pairs, expire):
        if not pairs:
            return None
        buf = build_sets(pairs, expire)  # validates every queue name before any I/O
        pending = pairs
        last_error = None
        for server in self.cluster.order():
            if buf is None:
                buf = build_sets(pending, expire)
            try:
                pending = self._put_on(server, pending, buf)
            except KestrelError as e:
                last_error = e
                pending = getattr(e, "remaining_pairs", pending)
                buf = None
                if not isinstance(e, KestrelServerError) or e.server_side:
                    self.cluster.mark_down(server)
                continue
            self.cluster.mark_up(server)
            if not pending:
                return None
            buf = None
        raise KestrelUnavailable("no Kestrel server stored %d of %d items (last error: %s)"
                                 % (len(pending), len(pairs), last_error), pending)

    def _put_on(self, server, pairs, buf):
        """Send the batch `buf` (of `pairs`) to one server; returns the pairs it answered
        NOT_STORED."""
        try:
            lines = self._call(server, self._send_sets, buf, len(pairs))
        except KestrelConnectionError as e:
            lines = getattr(e, "partial", [])
            stored, _ = count_stored(lines)
            e.remaining_pairs = unstored(pairs, stored)
            raise
        # PERF: the usual case checked at C speed: 0.3 us for 500 replies, against 19 us
        # for count_stored's per-line loop.
        if lines.count(STORED) == len(pairs):
            return ()
        stored, error = count_stored(lines)
        if error is not None:
            e = KestrelServerError(error.decode("utf-8", "replace"))
            e.remaining_pairs = unstored(pairs, stored)
            raise e
        if len(stored) == len(pairs):
            return ()
        # NOT_STORED for some: the server is fine, the next one may take them.
        return unstored(pairs, stored)

    def _send_sets(self, conn, buf, n):
        deadline = time.monotonic() + self.timeout
        conn.send(buf, self.timeout)
        lines = conn.read_lines(n, deadline)
        if lines.count(STORED) != n and count_stored(lines)[1] is not None:
            conn.close()  # Kestrel drops the connection after an error anyway
        else:
            conn.expect_clean()
        return lines

    # -- reads --

    def get(self, queue, timeout=None):
        """Remove and return the next item (bytes) or None; waits up to `timeout` ms."""
        return self._read(queue, timeout, dict())

    def peek(self, queue, timeout=None):
        """The head item (bytes) without removing it, or None."""
        return self._read(queue, timeout, dict(peek=True))

    def next(self, queue, timeout=None):
        """Close this thread's open read on `queue` (if any) and open the next item.

        The close goes to the connection holding the open read (`get q/close/open`); the
        new item stays open on its connection until next/finish/abort.  If that
        connection fails, the server rolls the read back (it will be delivered again)
        and the other servers are asked.
        """
        key = (threading.get_ident(), queue)
        held = self._open_reads.pop(key, None)
        if held is not None:
            try:
                item = self._on_held(held, get_command(queue, open_=True, close=True))
            except KestrelServerError as e:
                if not e.server_side:
                    raise
                item = None
                self.cluster.mark_down(held.server)
            except KestrelError:
                item = None
                self.cluster.mark_down(held.server)
            if item is not None:
                self._open_reads[key] = held
                return item
        return self._read(queue, timeout, dict(open_=True), key=key)

    def finish(self, queue):
        """Confirm this thread's open read on `queue`; False when none was open.

        Raises KestrelError when the server holding the read cannot be told (the read
        is then rolled back there and the item will be delivered again).
        """
        return self._end_read(queue, dict(close=True))

    def abort(self, queue):
        """Hand this thread's open read on `queue` back to the head of its queue."""
        return self._end_read(queue, dict(abort=True))

    def _end_read(self, queue, option):
        command = get_command(queue, **option)  # validates the name
        held = self._open_reads.pop((threading.get_ident(), queue), None)
        if held is None:
            return False
        self._on_held(held, command)
        return True

    def _on_held(self, conn, command):
        """One get on the connection of an open read; the connection goes back to the
        pool unless the reply opened another item."""
        try:
            item = self._get_on(conn, command, self.timeout)
        except BaseException:
            conn.close()
            raise
        if item is None:
            self._checkin(conn)
        return item

    def _read(self, queue, timeout, options, key=None):
        """Ask the healthy servers in turn; the first item wins.

        With one server the whole wait is one blocking `/t=`.  With several: one round
        without waiting, then rounds where each server blocks for its share of what is
        left of `timeout`, between MIN_SLICE_MS and MAX_SLICE_MS.
        """
        check_queue(queue)
        servers = self.cluster.order()
        if not servers:
            raise KestrelUnavailable("all Kestrel servers are backing off")
        timeout = max(0, int(timeout or 0))
        deadline = self.clock() + timeout / 1000.0
        wait = timeout if len(servers) == 1 else 0
        while True:
            failed = []
            for server in servers:
                item = self._read_one(server, queue, wait, options, key)
                if item is FAILED:
                    failed.append(server)
                elif item is not None:
                    return item
            now = self.clock()
            # A server that failed is not asked again in this call, even with retry_ms=0.
            servers = [s for s in servers if s not in failed]
            if not servers:
                raise KestrelUnavailable("no Kestrel server answered a get on %s" % queue)
            left_ms = int((deadline - now) * 1000)
            if left_ms <= 0:
                return None
            wait = min(left_ms, MAX_SLICE_MS, max(MIN_SLICE_MS, left_ms // len(servers)))

    def _read_one(self, server, queue, wait, options, key):
        """The item from one server, None when empty, FAILED when the server failed (it
        is then backing off)."""
        command = get_command(queue, wait, **options)
        try:
            item, conn = self._use(server, self._get_on, command,
                                   self.timeout + wait / 1000.0)
        except KestrelServerError as e:
            if not e.server_side:
                raise  # our request was refused (e.g. too many open reads)
            self.cluster.mark_down(server)
            return FAILED
        except KestrelError:
            self.cluster.mark_down(server)
            return FAILED
        self.cluster.mark_up(server)
        if item is not None and key is not None:
            self._open_reads[key] = conn  # stays checked out until the read is closed
        else:
            self._checkin(conn)
        return item

    def _get_on(self, conn, command, timeout):
        """Send one `get`, return the item or None.  The caller closes on error."""
        conn.send(command, timeout)
        n = parse_value_header(conn.readline())
        if n is None:
            conn.expect_clean()
            return None
        data = conn.read_exact(n + 2)
        if data[-2:] != CRLF or conn.readline() != END:
            conn.close()
            raise KestrelProtocolError("%s: malformed VALUE reply" % conn.server.address)
        conn.expect_clean()
        return data[:-2]

    # -- whole-cluster commands --

    def delete(self, queue):
        """Drop `queue` on every server; True when all answered DELETED (or END)."""
        command = b"delete %s\r\n" % check_queue(queue)
        return self._everywhere(command, (b"DELETED", END))

    def flush(self, queue):
        """Remove every item of `queue` on every server; True when all answered."""
        command = b"flush %s\r\n" % check_queue(queue)
        return self._everywhere(command, (END,))

    def flush_all(self):
        return self._everywhere(b"flush_all\r\n", None)

    def _everywhere(self, command, accepted):
        ok = True
        for server in self.cluster.servers:
            try:
                line = self._call(server, self._one_line, command)
            except KestrelError:
                ok = False
                continue
            if line.startswith((b"ERROR", b"CLIENT_ERROR", b"SERVER_ERROR")):
                ok = False
            elif accepted is not None and line not in accepted:
                ok = False
        return ok

    def _one_line(self, conn, command):
        conn.send(command, self.timeout)
        line = conn.readline()
        conn.expect_clean()
        return line

    def stats(self):
        """{address: {"server": {...}, "queues": {name: {...}}} or None when down}."""
        out = {}
        for server in self.cluster.servers:
            try:
                out[server.address] = parse_stats(self._call(server, self._stat_lines))
            except KestrelError:
                out[server.address] = None
        return out

    def _stat_lines(self, conn):
        conn.send(b"stats\r\n", self.timeout)
        lines = []
        while True:
            line = conn.readline()
            if line == END:
                break
            if not line.startswith(b"STAT "):
                raise_reply(line)
            lines.append(line.decode("utf-8", "replace"))
        conn.expect_clean()
        return lines

    def version(self):
        """The version string of the first server that answers."""
        for server in self.cluster.servers:
            try:
                line = self._call(server, self._one_line, b"version\r\n")
            except KestrelError:
                continue
            if line.startswith(b"VERSION "):
                return line[8:].decode("utf-8", "replace")
        raise KestrelUnavailable("no Kestrel server answered `version`")

    def close(self):
        """Close every idle and held connection (held open reads go back to their queues)."""
        for conn in list(self._open_reads.values()):
            conn.close()
        self._open_reads.clear()
        for server in self.cluster.servers:
            drop_idle(server)
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
