"""Parallel reliable reads: several connections in one thread, each item confirmed only
after the caller is done with it.

What it is for: draining a queue faster than one reliable read at a time.  Kestrel 2.x
allows one open read per queue and connection by default (maxOpenTransactions 1) and
Darner one per connection, so one connection cannot pipeline `/open`s: parallelism comes
from several connections ("lanes", spread over the servers), each holding at most one
open read.  One `get q/close/open/t=<ms>` per item confirms the previous item of that
lane and opens the next in a single round trip (what pykestrel's next() sends).  One
thread multiplexes the lanes with a selector, so an item costs one send and one recv,
and one poll serves every lane that is ready at that moment.

    with Consumer(["10.0.0.1:22133"], "events", connections=4) as consumer:
        consumer.run(handle)            # handle(data) per item, confirmed after it returns

What it must not do: confirm an item before its handler returned (or before the caller
confirmed it), hold more than one open read per lane or open more than `max_items`,
import eventlet (a monkey-patched process gets green sockets and selectors anyway), or
leave an open read behind: close() aborts the reads it holds and drops the connections
still waiting, and a server puts every open read of a dropped connection back at the
head of its queue, so an unconfirmed item is delivered again, never lost.
"""
import selectors
import socket
import time

from ingest.kestrel.client import MIN_SLICE_MS
from ingest.kestrel.cluster import ServerSet
from ingest.kestrel.errors import KestrelError, KestrelProtocolError, KestrelUnavailable
from ingest.kestrel.protocol import (CRLF, END, check_queue, get_command, parse_servers,
                                     parse_value_header)

RECV_BYTES = 65536
MAX_RECV_BYTES = 1 << 20
VALUE_END = CRLF + END + CRLF

# Lane states: what the connection is waiting for.
IDLE = "idle"          # nothing outstanding, nothing open (maybe not connected)
WAITING = "waiting"    # a `get .../open` sent: the reply is an item or END
HELD = "held"          # an open read handed to the caller, not yet confirmed
ENDING = "ending"      # a `get q/close` or `get q/abort` sent: the reply is END


class Item:
    """One opened item: `data` (bytes) and the `server` ("host:port") it came from.

    Confirm or abort it through its Consumer.  `lost` becomes True when the connection
    holding it failed first: the server then puts it back and delivers it again.
    """

    __slots__ = ("data", "server", "lane", "lost")

    def __init__(self, data, lane):
        self.data = data
        self.server = lane.server.address
        self.lane = lane
        self.lost = False

    def __repr__(self):
        return "<kestrel.Item %d bytes from %s>" % (len(self.data), self.server)


class Lane:
    """One connection to one server: at most one request outstanding, one read open."""

    __slots__ = ("server", "sock", "state", "chunks", "have", "need", "due", "deadline",
                 "item")

    def __init__(self, server):
        self.server = server
        self.sock = None
        self.state = IDLE
        self.chunks = []
        self.have = 0
        self.need = 0          # bytes of the whole reply, once its header is known
        self.due = 0.0         # when the server answers at the latest (the end of /t=)
        self.deadline = 0.0    # when the outstanding reply is overdue (due + timeout)
        self.item = None


class Consumer:
    """Reliable reads of `queue` over `connections` lanes spread over `servers`.

    `servers`: ["host:port", ...] or "host:port,...".  Times are milliseconds: `wait_ms`
    is each blocking read's `/t=`, `timeout_ms` how late a reply may be beyond that,
    `retry_ms` how long a failed server is left alone.  `max_items` caps the items
    opened over the consumer's life (None: no cap).  Not thread-safe: one thread (or
    green thread) uses a Consumer.
    """

    def __init__(self, servers, queue, connections=4, wait_ms=500, connect_timeout_ms=500,
                 timeout_ms=2000, retry_ms=1000, max_items=None, clock=time.monotonic):
        self.queue = queue
        check_queue(queue)
        self.cluster = ServerSet(parse_servers(servers), retry_ms, clock)
        servers = self.cluster.servers
        count = max(int(connections), len(servers))   # every server gets a lane
        self.lanes = [Lane(servers[i % len(servers)]) for i in range(count)]
        self.wait_ms = max(0, int(wait_ms))
        self.connect_timeout = connect_timeout_ms / 1000.0
        self.timeout = timeout_ms / 1000.0
        self.max_items = max_items
        # With a cap and several servers, a read blocks for a short slice at most, so an
        # empty server cannot hold the last reads the cap allows while another has items.
        self._read_wait = (min(self.wait_ms, MIN_SLICE_MS)
                           if max_items is not None and len(servers) > 1 else self.wait_ms)
        self.clock = clock
        self.opened = 0        # items handed to the caller
        self.waiting = 0       # lanes in WAITING
        self.lost = 0          # confirms that could not reach the server (redelivered)
        self.selector = selectors.DefaultSelector()
        self._commands = {}
        self._turn = 0
        self._close = get_command(queue, close=True)
        self._abort = get_command(queue, abort=True)

    def __repr__(self):
        return "<kestrel.Consumer %s on %d lanes>" % (self.queue, len(self.lanes))

    # -- the caller's side ------------------------------------------------------------

    def fetch(self, timeout_ms=None):
        """The items opened since the last call, waiting up to `timeout_ms` (default
        `wait_ms`) for at least one; [] when none came in time, when `max_items` is
        reached, or at once when the caller still holds unconfirmed items and no lane is
        free to open another (at most one open read per lane).

        Raises KestrelUnavailable when no server can be read at all.
        """
        wait = self.wait_ms if timeout_ms is None else max(0, int(timeout_ms))
        deadline = self.clock() + wait / 1000.0
        first = True
        while True:
            now = self.clock()
            starting = first or now < deadline
            if starting:
                self._start_reads(now, deadline)
                first = False
                now = self.clock()     # a read just sent with /t=0 is due already
            if not self.waiting and not self._count(ENDING):
                # Nothing can arrive: the time is up, the budget is spent, the caller
                # holds every item it may have, or no server is healthy.
                if not starting or self._budget() <= 0 or self._count(HELD):
                    return []
                raise KestrelUnavailable("no Kestrel server could be read for %s"
                                         % self.queue)
            # Past the deadline, still wait for the replies due by now (a read sent with
            # /t=0 answers at once, one sent with /t=<wait> when its wait ends), and take
            # those that came early (a waiting read answers as soon as an item is there).
            if now >= deadline and not self._due_by(now):
                return self._poll(0)
            items = self._poll(self._poll_timeout(now, deadline))
            if items:
                return items

    def confirm(self, items):
        """Confirm each item (`get q/close`); its lane opens the next item in the same
        command while `max_items` allows.  An item whose connection failed is skipped
        (`lost`): the server delivers it again."""
        for item in items:
            lane = item.lane
            if lane.item is not item:
                self.lost += 1          # its connection failed: the server has it back
                continue
            lane.item = None
            if self._budget() - self.waiting > 0:
                self._send(lane, self._read_command(self._read_wait, close=True), WAITING,
                           self._read_wait)
            else:
                self._send(lane, self._close, ENDING, 0)
            if lane.sock is None:
                item.lost = True
                self.lost += 1

    def abort(self, items):
        """Hand each item back to the head of its queue (`get q/abort`)."""
        for item in items:
            lane = item.lane
            if lane.item is item:
                lane.item = None
                self._send(lane, self._abort, ENDING, 0)
                item.lost = lane.sock is None

    def run(self, handler, idle_ms=None):
        """Call handler(data) for each item and confirm it once the handler returned;
        stop after `idle_ms` (default: never) without an item or at `max_items`.

        If the handler raises, its item and the rest of that batch are aborted (back to
        the head of the queue) and the exception propagates.  Returns the item count.
        """
        count = 0
        while True:
            batch = self.fetch(idle_ms if idle_ms is not None else self.wait_ms)
            if not batch:
                if idle_ms is not None or self._budget() <= 0:
                    return count
                continue
            for i, item in enumerate(batch):
                try:
                    handler(item.data)
                except BaseException:
                    self.abort(batch[i:])
                    raise
                self.confirm((item,))
                count += 1

    def close(self):
        """Abort every held read, drop every connection; waits (at most `timeout_ms`)
        for the servers to answer the aborts and confirms still in flight.  Closing
        twice is harmless."""
        if self.selector is None:
            return
        for lane in self.lanes:
            if lane.state == WAITING:
                self._drop(lane)       # the server rolls back whatever it opened for us
            elif lane.state == HELD:
                lane.item.lost = True
                lane.item = None
                self._send(lane, self._abort, ENDING, 0)
        deadline = self.clock() + self.timeout
        while any(lane.state == ENDING for lane in self.lanes):
            left = deadline - self.clock()
            if left <= 0:
                break
            self._poll(left)
        for lane in self.lanes:
            self._drop(lane)
        self.selector.close()
        self.selector = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- lanes ------------------------------------------------------------------------

    def _budget(self):
        """How many more items may be opened (waiting lanes included)."""
        if self.max_items is None:
            return 1 << 62
        return self.max_items - self.opened

    def _count(self, state):
        return sum(1 for lane in self.lanes if lane.state == state)

    def _read_command(self, wait_ms, close=False):
        key = (wait_ms, close)
        command = self._commands.get(key)
        if command is None:
            command = self._commands[key] = get_command(self.queue, wait_ms, open_=True,
                                                        close=close)
        return command

    def _start_reads(self, now, deadline):
        """An open read on every idle lane whose server is healthy, within the budget."""
        wait_ms = max(0, min(self._read_wait, int((deadline - now) * 1000)))
        free = self._budget() - self.waiting
        lanes = self.lanes
        if free < len(lanes):
            # Fewer reads allowed than lanes (max_items nearly reached): give them to the
            # servers in turn.
            self._turn = (self._turn + 1) % len(lanes)
            lanes = lanes[self._turn:] + lanes[:self._turn]
        for lane in lanes:
            if free <= 0:
                return
            if lane.state != IDLE or not self.cluster.healthy(lane.server, now):
                continue
            if lane.sock is None and not self._connect(lane):
                continue
            self._send(lane, self._read_command(wait_ms), WAITING, wait_ms)
            free -= 1

    def _connect(self, lane):
        server = lane.server
        try:
            sock = socket.create_connection((server.host, server.port), self.connect_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
        except OSError:
            self.cluster.mark_down(server)
            return False
        lane.sock = sock
        self.selector.register(sock, selectors.EVENT_READ, lane)
        return True

    def _send(self, lane, command, state, wait_ms):
        """Send one command on `lane` and expect its reply; a failure drops the lane."""
        if lane.sock is None:
            return
        try:
            sent = lane.sock.send(command)
            if sent < len(command):   # never seen with a drained socket; stay correct
                lane.sock.settimeout(self.timeout)
                lane.sock.sendall(command[sent:])
                lane.sock.setblocking(False)
        except (OSError, ValueError):
            self._fail(lane)
            return
        lane.state = state
        lane.due = self.clock() + wait_ms / 1000.0
        lane.deadline = lane.due + self.timeout
        if state == WAITING:
            self.waiting += 1

    def _due_by(self, deadline):
        return any(lane.state == WAITING and lane.due <= deadline for lane in self.lanes)

    def _poll_timeout(self, now, deadline):
        """Until the fetch deadline (or, past it, the replies due by then) or the first
        overdue reply, whichever comes first."""
        overdue = min([lane.deadline for lane in self.lanes if lane.state in (WAITING, ENDING)],
                      default=deadline)
        return max(0.0, min(deadline if now < deadline else overdue, overdue) - now)

    def _poll(self, timeout):
        """One select; returns the items that arrived.  Overdue replies drop their lane."""
        items = []
        for key, _events in self.selector.select(timeout):
            item = self._on_readable(key.data)
            if item is not None:
                items.append(item)
        now = self.clock()
        for lane in self.lanes:
            if lane.state in (WAITING, ENDING) and now > lane.deadline:
                self._fail(lane)
        return items

    def _on_readable(self, lane):
        try:
            chunk = lane.sock.recv(max(RECV_BYTES, min(lane.need - lane.have, MAX_RECV_BYTES)))
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            chunk = b""
        if not chunk or lane.state not in (WAITING, ENDING):
            self._fail(lane)           # closed, or bytes nobody asked for
            return None
        lane.chunks.append(chunk)
        lane.have += len(chunk)
        try:
            return self._parse(lane)
        except KestrelError:
            self._fail(lane)
            return None

    def _parse(self, lane):
        """The reply in the lane's buffer: an Item, or None (END, or not complete yet)."""
        if lane.have < lane.need:
            return None
        buf = b"".join(lane.chunks) if len(lane.chunks) > 1 else lane.chunks[0]
        eol = buf.find(CRLF)
        if eol < 0:
            lane.chunks, lane.need = [buf], lane.have + 1
            return None
        size = parse_value_header(buf[:eol]) if lane.state == WAITING else None
        if size is None:
            if buf[:eol] != END or len(buf) != eol + 2:
                raise KestrelProtocolError("unexpected reply on %s" % lane.server.address)
            self._reply_done(lane, IDLE)
            return None
        total = eol + 2 + size + len(VALUE_END)
        if len(buf) < total:
            lane.chunks, lane.need = [buf], total
            return None
        if len(buf) > total or buf[total - len(VALUE_END):] != VALUE_END:
            raise KestrelProtocolError("malformed VALUE reply from %s" % lane.server.address)
        item = lane.item = Item(buf[eol + 2:eol + 2 + size], lane)
        self.opened += 1
        self._reply_done(lane, HELD)
        return item

    def _reply_done(self, lane, state):
        if lane.state == WAITING:
            self.waiting -= 1
        lane.state = state
        lane.chunks, lane.have, lane.need = [], 0, 0
        if lane.server.failures:
            self.cluster.mark_up(lane.server)

    def _fail(self, lane):
        """The lane's connection failed: drop it (its open read goes back on the server)
        and leave its server alone for retry_ms."""
        if lane.item is not None:
            lane.item.lost = True
            lane.item = None
        self._drop(lane)
        self.cluster.mark_down(lane.server)

    def _drop(self, lane):
        if lane.state == WAITING:
            self.waiting -= 1
        if lane.sock is not None:
            try:
                self.selector.unregister(lane.sock)
            except (KeyError, ValueError):
                pass
            lane.sock.close()
            lane.sock = None
        lane.state = IDLE
        lane.item = None
        lane.chunks, lane.have, lane.need = [], 0, 0

