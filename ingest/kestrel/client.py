"""Cluster-aware Kestrel client (pykestrel's method names, Python 3, green-thread safe).

What it is for: talking Kestrel's memcache protocol to a set of share-nothing servers
(the bundled `ingest queue`, real Kestrel 2.x or Darner).  Writes go to one healthy
server and fail over to the next; a failed server is skipped for `retry_ms`.  Reads
visit the servers in turn.  A reliable read (`next`) stays on the connection that
opened it until `next`/`finish`/`abort` closes it there.  The bytes come from
protocol.py, the servers and sockets from cluster.py, the errors from errors.py.

What it must not do: import eventlet (the caller monkey-patches `socket`, which makes
every socket here green), share one socket between two users at the same time, return
a socket with a half-read reply to the pool, or report an item as stored without the
server's `STORED`.  Only commands that Kestrel 2.x and Darner both understand are sent
(lower-case `set`, `get` with `/open`, `/close`, `/abort`, `/peek`, `/t=`, `delete`,
`flush`, `flush_all`, `stats`, `version`).

All timeouts are in milliseconds.
"""
import threading
import time

from ingest.kestrel.cluster import Connection, ServerSet, drop_idle
from ingest.kestrel.errors import (KestrelConnectionError, KestrelError, KestrelProtocolError,
                                   KestrelServerError, KestrelTimeout, KestrelUnavailable)
from ingest.kestrel.protocol import (CRLF, DELETED, END, STAT_PREFIX, STORED, VERSION_PREFIX,
                                     build_sets, check_queue, count_stored, format_command,
                                     get_command, is_error_reply, parse_servers, parse_stats,
                                     parse_value_header, raise_reply)

# Blocking reads over several servers wait on one server at a time: at least Kestrel's
# 100 ms timer tick, at most 500 ms so an item arriving elsewhere waits that long at most.
MIN_SLICE_MS = 100
MAX_SLICE_MS = 500

FAILED = object()  # _read_one's answer for a server that failed


def unstored(pairs, stored):
    """The pairs whose index is not in `stored` (the STORED replies), in order."""
    if not stored:
        return list(pairs)
    done = set(stored)
    return [p for i, p in enumerate(pairs) if i not in done]


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
                if not conn.reused or e.partial or isinstance(e, KestrelTimeout):
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
        answered = 0
        for server in self.cluster.order():
            if buf is None:
                buf = build_sets(pending, expire)
            try:
                pending = self._put_on(server, pending, buf)
            except KestrelError as e:
                last_error = e
                if e.remaining is not None:
                    pending = e.remaining
                buf = None
                if not isinstance(e, KestrelServerError) or e.server_side:
                    self.cluster.mark_down(server)
                continue
            self.cluster.mark_up(server)
            if not pending:
                return None
            answered += 1
            buf = None
        raise KestrelUnavailable("no Kestrel server stored %d of %d items (last error: %s)"
                                 % (len(pending), len(pairs), last_error), pending,
                                 refused=last_error is None and
                                 answered == len(self.cluster.servers))

    def _put_on(self, server, pairs, buf):
        """Send the batch `buf` (of `pairs`) to one server; returns the pairs it answered
        NOT_STORED."""
        try:
            lines = self._call(server, self._send_sets, buf, len(pairs))
        except KestrelConnectionError as e:
            stored, _ = count_stored(e.partial)
            raise e.with_remaining(unstored(pairs, stored)) from None
        # PERF: the usual case checked at C speed: 0.3 us for 500 replies, against 19 us
        # for count_stored's per-line loop.
        if lines.count(STORED) == len(pairs):
            return ()
        stored, error = count_stored(lines)
        if error is not None:
            raise KestrelServerError(error.decode("utf-8", "replace"),
                                     remaining=unstored(pairs, stored))
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
        return self._everywhere(format_command(b"delete", check_queue(queue)), (DELETED, END))

    def flush(self, queue):
        """Remove every item of `queue` on every server; True when all answered."""
        return self._everywhere(format_command(b"flush", check_queue(queue)), (END,))

    def flush_all(self):
        return self._everywhere(format_command(b"flush_all"), None)

    def _everywhere(self, request, accepted):
        ok = True
        for server in self.cluster.servers:
            try:
                line = self._call(server, self._one_line, request)
            except KestrelError:
                ok = False
                continue
            if is_error_reply(line):
                ok = False
            elif accepted is not None and line not in accepted:
                ok = False
        return ok

    def _one_line(self, conn, request):
        conn.send(request, self.timeout)
        line = conn.readline()
        conn.expect_clean()
        return line

    def stats(self, errors=None):
        """{address: {"server": {...}, "queues": {name: {...}}} or None when down}.

        `errors`, a dict, receives {address: why} for each server that did not answer."""
        out = {}
        for server in self.cluster.servers:
            try:
                out[server.address] = parse_stats(self._call(server, self._stat_lines))
            except KestrelError as e:
                out[server.address] = None
                if errors is not None:
                    errors[server.address] = str(e)
        return out

    def _stat_lines(self, conn):
        conn.send(format_command(b"stats"), self.timeout)
        lines = []
        while True:
            line = conn.readline()
            if line == END:
                break
            if not line.startswith(STAT_PREFIX):
                raise_reply(line)
            lines.append(line.decode("utf-8", "replace"))
        conn.expect_clean()
        return lines

    def version(self):
        """The version string of the first server that answers."""
        for server in self.cluster.servers:
            try:
                line = self._call(server, self._one_line, format_command(b"version"))
            except KestrelError:
                continue
            if line.startswith(VERSION_PREFIX):
                return line[len(VERSION_PREFIX):].decode("utf-8", "replace")
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
