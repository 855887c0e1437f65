"""`ingest queue`: the bundled Kestrel-compatible durable queue server (memcache protocol).

One eventlet green thread per connection.  A connection reads big chunks, executes every
complete command in the buffer, then (1) writes the journal records of the whole batch
with one os.write per touched journal, (2) under --sync-ms 0 waits for one shared
(group-committed) fsync, (3) sends all replies with one sendall.  So a STORED is only
ever sent after the item is in the journal file: a process crash loses nothing, and an
OS crash loses at most one --sync-ms period (nothing with --sync-ms 0).

Rules that keep this correct: queue state only changes inside a connection's batch (or
its cleanup, or startup) and every change is journaled in memory order; the buffered
records are written before the green thread can yield (sendall, fsync wait, blocking
get), so journal order always equals memory order.

This module and ingest/server.py are the only ones that may use eventlet.  It must not
buffer unboundedly: request lines are capped (protocol.MAX_LINE_BYTES) and a data block
longer than the largest allowed item is discarded as it streams in, never allocated.
"""
import collections
import json
import logging
import os
import posix
import signal
import socket
import sys
import time

import eventlet
import eventlet.event
import greenlet
from eventlet import hubs, tpool

from ingest import __version__
from ingest.queue import journal as jr
from ingest.kestrel import protocol as proto

log = logging.getLogger("ingest.queue")

VERSION = "2.4.1-ingest-%s" % __version__
# PERF: one 256 KiB read carries a whole client batch (100 x 1 KiB sets = 103 KB): server
# CPU 4.9-5.0 us/item vs 5.3-5.7 us/item with 64 KiB reads (bench/queue_server_bench.py).
RECV_BYTES = 256 * 1024
DEFAULT_MAX_ITEM_BYTES = 16 * 1024 * 1024
STORED, NOT_STORED, END = b"STORED\r\n", b"NOT_STORED\r\n", b"END\r\n"
ERROR, DELETED = b"ERROR\r\n", b"DELETED\r\n"

QUEUE_SETTINGS = {
    # name: (default, type check)
    "max_items": (None, int),
    "max_bytes": (None, int),
    "max_item_bytes": (None, int),          # None -> the server's --max-item-bytes
    "discard_old_when_full": (False, bool),
    "max_age_ms": (None, int),
    "max_open_transactions": (100, int),
    # journal of a drained queue (no items, no open reads) is truncated once this big
    "drained_journal_bytes": (1024 * 1024, int),
    # a journal bigger than this AND bigger than 4x its live records is rewritten
    "compact_journal_bytes": (16 * 1024 * 1024, int),
}
COMPACT_RATIO = 4


# ---- configuration ---------------------------------------------------------------------

class QueueConfig:
    """Settings of one queue (see QUEUE_SETTINGS); plain attributes."""

    def __init__(self, values):
        for key, value in values.items():
            setattr(self, key, value)


class ConfigSet:
    """The parsed --config file: defaults, per-queue overrides, fanout inheritance."""

    def __init__(self, data, max_item_bytes):
        data = data or {}
        unknown = set(data) - {"default", "queues"}
        if unknown:
            raise ValueError("unknown top-level keys %s" % sorted(unknown))
        base = {k: v[0] for k, v in QUEUE_SETTINGS.items()}
        base["max_item_bytes"] = max_item_bytes
        self.default = _merge(base, data.get("default") or {}, "default")
        self.queues = {name: _merge({}, spec or {}, name)
                       for name, spec in (data.get("queues") or {}).items()}
        # the largest data block a connection will ever buffer
        self.buffer_cap = max([self.default["max_item_bytes"]] + [
            spec["max_item_bytes"] for spec in self.queues.values()
            if spec.get("max_item_bytes") is not None])

    def for_queue(self, name):
        """default -> fanout parent's settings -> the queue's own settings."""
        values = dict(self.default)
        if "+" in name:
            values.update(self.queues.get(name.split("+", 1)[0], {}))
        values.update(self.queues.get(name, {}))
        return QueueConfig(values)


def _merge(base, spec, where):
    out = dict(base)
    for key, value in spec.items():
        if key not in QUEUE_SETTINGS:
            raise ValueError("%s: unknown setting %r" % (where, key))
        kind = QUEUE_SETTINGS[key][1]
        if value is not None and (not isinstance(value, kind) or
                                  (kind is int and (isinstance(value, bool) or value < 0))):
            raise ValueError("%s: %s must be a non-negative %s" % (where, key, kind.__name__))
        out[key] = value
    return out


def load_config(path, max_item_bytes):
    if not path:
        return ConfigSet({}, max_item_bytes)
    with open(path, "rb") as fh:
        return ConfigSet(json.loads(fh.read().decode("utf-8")), max_item_bytes)


# ---- one queue -------------------------------------------------------------------------

class Queue:
    """A FIFO of ADD records plus its open reads, journal and counters.  No I/O except
    through its Journal; no eventlet except scheduling waiter wake-ups."""

    def __init__(self, name, path, config, touched):
        self.name = name
        self.name_bytes = name.encode("utf-8", "surrogateescape")
        self.config = config
        self.items = collections.deque()
        self.bytes = 0
        self.open = {}                # xid -> record, in opening order
        self.open_bytes = 0
        self.next_xid = 1
        self.waiters = collections.deque()   # blocked consumers, woken one per item
        self.peekers = collections.deque()   # blocked peeks, all woken by an item
        self.children = []            # fanout: queues named <name>+<child>
        self.journal = jr.Journal(path)
        self.touched = touched        # server-wide set of queues with unwritten records
        self.deleted = False
        self.total_items = self.expired = self.discarded = 0
        self.last_removed_add_ms = 0

    # -- journal helpers
    def _log(self, record):
        self.journal.append(record)
        self.touched.add(self)

    def restore(self, state):
        """Adopt a replayed journal; reads open at the crash go back to the head."""
        self.items = state.items
        self.bytes = sum(jr.item_size(r) for r in self.items)
        self.next_xid = state.max_xid + 1
        rolled = list(state.open.items())
        for xid, record in reversed(rolled):
            self.items.appendleft(record)
            self.bytes += jr.item_size(record)
            self._log(jr.encode_xid(jr.OP_UNREMOVE, xid))
        if rolled:
            log.info("queue %s: rolled back %d reads open at the last stop",
                     self.name, len(rolled))

    # -- writes
    def add(self, record, size, now_ms):
        """Append one item; False (NOT_STORED) when too big or full and not discarding."""
        cfg = self.config
        if cfg.max_item_bytes is not None and size > cfg.max_item_bytes:
            return False
        if self._full() and (self.expire_head(now_ms) == 0 or self._full()):
            if not cfg.discard_old_when_full:
                return False
            while self.items and self._full():
                self._drop_head()
                self.discarded += 1
        if cfg.max_age_ms is not None:
            record = self._cap_age(record, now_ms)
        self.items.append(record)
        self.bytes += size
        self.total_items += 1
        self._log(record)
        if self.waiters or self.peekers:
            self.wake()
        return True

    def _full(self):
        cfg = self.config
        return ((cfg.max_items is not None and len(self.items) >= cfg.max_items) or
                (cfg.max_bytes is not None and self.bytes >= cfg.max_bytes))

    def _cap_age(self, record, now_ms):
        limit = now_ms + self.config.max_age_ms
        expiry = jr.item_expiry_ms(record)
        if expiry and expiry <= limit:
            return record
        return jr.encode_add(jr.item_data(record), jr.item_add_ms(record), limit)

    def _drop_head(self):
        record = self.items.popleft()
        self.bytes -= jr.item_size(record)
        self.last_removed_add_ms = jr.item_add_ms(record)
        self._log(jr.REMOVE_RECORD)
        return record

    def expire_head(self, now_ms):
        """Drop expired items at the head (only the head is examined, like Kestrel)."""
        n = 0
        items = self.items
        while items:
            expiry = jr.item_expiry_ms(items[0])
            if not expiry or expiry > now_ms:
                break
            self._drop_head()
            n += 1
        self.expired += n
        return n

    # -- reads
    def take(self, now_ms):
        self.expire_head(now_ms)
        return self._drop_head() if self.items else None

    def peek(self, now_ms):
        self.expire_head(now_ms)
        return self.items[0] if self.items else None

    def open_head(self, now_ms):
        """Tentatively remove the head; returns (xid, record) or None."""
        self.expire_head(now_ms)
        if not self.items:
            return None
        record = self.items.popleft()
        size = jr.item_size(record)
        self.bytes -= size
        self.last_removed_add_ms = jr.item_add_ms(record)
        xid, self.next_xid = self.next_xid, self.next_xid + 1
        self.open[xid] = record
        self.open_bytes += size
        self._log(jr.encode_xid(jr.OP_OPEN, xid))
        return xid, record

    def confirm(self, xid):
        record = self.open.pop(xid, None)
        if record is not None and not self.deleted:
            self.open_bytes -= jr.item_size(record)
            self._log(jr.encode_xid(jr.OP_CONFIRM, xid))

    def unremove(self, xid):
        """An open read goes back to the head (abort, disconnect)."""
        record = self.open.pop(xid, None)
        if record is None or self.deleted:
            return
        size = jr.item_size(record)
        self.open_bytes -= size
        self.items.appendleft(record)
        self.bytes += size
        self._log(jr.encode_xid(jr.OP_UNREMOVE, xid))
        if self.waiters or self.peekers:
            self.wake()

    def flush(self):
        if self.items:
            self.last_removed_add_ms = jr.item_add_ms(self.items[-1])
        self.items.clear()
        self.bytes = 0
        self._log(jr.FLUSH_RECORD)

    # -- waiters
    def wake(self):
        """An item is at the head: wake every blocked peek and one blocked consumer."""
        hub = hubs.get_hub()
        head = self.items[0] if self.items else None
        while self.peekers:
            # a peeker gets the head as of now, even if the consumer woken with it runs
            # first and takes it
            waiter = self.peekers.popleft()
            waiter.record = head
            hub.schedule_call_global(0, waiter.fire, WOKEN)
        if self.waiters:
            hub.schedule_call_global(0, self.waiters.popleft().fire, WOKEN)

    def wake_all(self):
        hub = hubs.get_hub()
        for waiters in (self.waiters, self.peekers):
            while waiters:
                hub.schedule_call_global(0, waiters.popleft().fire, WOKEN)

    def waiting(self, peek):
        """The list a blocked get of this kind waits in."""
        return self.peekers if peek else self.waiters

    # -- journal maintenance
    def live_bytes(self):
        return (self.bytes + self.open_bytes +
                jr.DATA_OFFSET * (len(self.items) + len(self.open)))

    def maintain(self, close_fd):
        """After a write: truncate a drained journal, compact a mostly-dead one."""
        size, cfg = self.journal.size, self.config
        if not self.items and not self.open:
            if size and size >= cfg.drained_journal_bytes:
                self.journal.truncate()
        elif size > cfg.compact_journal_bytes and size > COMPACT_RATIO * self.live_bytes():
            self.rewrite(close_fd)

    def rewrite(self, close_fd):
        """Journal := ADD+OPEN for each open read, then ADD for each queued item."""
        records = list(self.open.values())
        records.extend(jr.encode_xid(jr.OP_OPEN, xid) for xid in self.open)
        records.extend(self.items)
        before = self.journal.size
        self.journal.rewrite(records, close_fd)
        log.info("queue %s: journal rewritten, %d -> %d bytes",
                 self.name, before, self.journal.size)

    def stats(self, now_ms):
        age = now_ms - self.last_removed_add_ms if self.bytes and self.last_removed_add_ms else 0
        return [("items", len(self.items)), ("bytes", self.bytes),
                ("total_items", self.total_items), ("logsize", self.journal.size),
                ("expired_items", self.expired), ("mem_items", len(self.items)),
                ("mem_bytes", self.bytes), ("age", age), ("discarded", self.discarded),
                ("waiters", len(self.waiters) + len(self.peekers)),
                ("open_transactions", len(self.open))]


# ---- waiting for an item without polling ------------------------------------------------

WOKEN, TIMEOUT, READABLE, GONE = "woken", "timeout", "readable", "gone"


class Waiter:
    """One blocked `get /t=`: resumed by an add (WOKEN), its timer, or its socket."""

    __slots__ = ("glet", "peek", "done", "record")

    def __init__(self, glet, peek):
        self.glet, self.peek, self.done, self.record = glet, peek, False, None

    def fire(self, reason):
        # Runs in the hub.  `done` makes stale timers or wake-ups harmless.
        if not self.done:
            self.done = True
            self.glet.switch(reason)

    def readable(self, _fileno):
        if not self.done:
            self.glet.switch(READABLE)

    def closed(self, *_exc):
        self.fire(GONE)


def park(waiter, seconds, fileno):
    """Suspend the current green thread until woken, timed out, or (when `fileno` is not
    None) the peer closes.  Returns WOKEN, TIMEOUT or GONE."""
    hub = hubs.get_hub()
    timer = hub.schedule_call_global(seconds, waiter.fire, TIMEOUT)
    listener = None
    if fileno is not None:
        listener = hub.add(hub.READ, fileno, waiter.readable, waiter.closed, _noop)
    try:
        return hub.switch()
    finally:
        if listener is not None:
            hub.remove(listener)
        timer.cancel()


def _noop(*_args):
    pass


class ConnectionGone(Exception):
    pass


class CloseConnection(Exception):
    """Send what is buffered (e.g. CLIENT_ERROR) and close."""


# ---- fsync policy ------------------------------------------------------------------------

class Syncer:
    """fsyncs dirty journals in a worker thread (tpool) so the hub keeps serving.

    sync_ms > 0: a green thread syncs every sync_ms.  sync_ms == 0: group commit —
    connections call `wait_durable()` after writing; one round fsyncs every dirty journal
    and releases every connection that was waiting when it started.
    """

    def __init__(self, journals, sync_ms):
        self.journals = journals      # callable -> iterable of Journal
        self.sync_ms = sync_ms
        self.busy = False
        self.retired = []
        self.waiting = []
        self.kick = None

    def start(self):
        eventlet.spawn_n(self._group_loop if self.sync_ms == 0 else self._periodic_loop)

    def close_fd(self, fd):
        """Close an fd no longer used by a journal, after any in-flight fsync of it."""
        if self.busy:
            self.retired.append(fd)
        else:
            os.close(fd)

    def _round(self):
        fds = []
        for j in self.journals():
            if j.dirty and j.fd is not None:
                j.dirty = False
                fds.append(j.fd)
        if not fds:
            return
        self.busy = True
        try:
            failed = tpool.execute(_fsync_all, fds)
        finally:
            self.busy = False
            retired, self.retired = self.retired, []
            for fd in retired:
                os.close(fd)
        if failed:
            # After a failed fsync the kernel may have dropped the dirty pages: what was
            # acknowledged is no longer known to be on disk.  Restart from the journals.
            jr.fatal_io_error("fsync", OSError("fsync failed: %s" % failed))

    def _periodic_loop(self):
        while True:
            eventlet.sleep(self.sync_ms / 1000.0)
            self._safe_round()

    def _group_loop(self):
        while True:
            if not self.waiting:
                self.kick = eventlet.event.Event()
                self.kick.wait()
            batch, self.waiting = self.waiting, []
            error = self._safe_round()
            for ev in batch:
                if error is None:
                    ev.send()
                else:     # not durable: the connection must not acknowledge
                    ev.send_exception(error)

    def _safe_round(self):
        try:
            self._round()
        except OSError as exc:
            log.error("%s", exc)
            return exc
        return None

    def wait_durable(self):
        ev = eventlet.event.Event()
        self.waiting.append(ev)
        if self.kick is not None and not self.kick.ready():
            self.kick.send()
        ev.wait()

    def sync_all_now(self):
        """Blocking fsync of everything (shutdown)."""
        for j in self.journals():
            if j.fd is not None:
                j.write()
                j.fsync()
                j.dirty = False


def _fsync_all(fds):
    """Runs in a real thread: no logging (its locks are green), errors are returned."""
    failed = []
    for fd in fds:
        try:
            os.fsync(fd)
        except OSError as exc:
            failed.append("fd %d: %s" % (fd, exc))
    return failed


# ---- the queue collection and server-wide state -------------------------------------------

class QueueServer:
    """All queues by name, fanout links, server counters, the syncer and the stop flag."""

    def __init__(self, data_dir, config, sync_ms, config_path=None):
        self.data_dir = data_dir
        self.config = config
        self.config_path = config_path
        self.queues = {}              # name (str) -> Queue
        self.by_bytes = {}            # name (bytes) -> Queue: the hot-path lookup
        self.fanout = {}              # parent name -> list of child Queues
        self.touched = set()
        self.syncer = Syncer(lambda: [q.journal for q in self.queues.values()], sync_ms)
        self.sync_ms = sync_ms
        self.started = time.time()
        self.stop_event = eventlet.event.Event()
        self.counters = dict.fromkeys(("curr_connections", "total_connections", "cmd_get",
                                       "cmd_set", "cmd_peek", "get_hits", "get_misses"), 0)

    # -- queues
    def load(self):
        os.makedirs(self.data_dir, exist_ok=True)
        for entry in sorted(os.listdir(self.data_dir)):
            path = os.path.join(self.data_dir, entry)
            if "~~" in entry:
                os.unlink(path)           # an interrupted rewrite; the original is intact
                continue
            if not os.path.isfile(path) or not proto.valid_queue_name(entry):
                continue
            q = self._create(entry)
            q.restore(jr.load(path))
        self.write_pending()
        log.info("loaded %d queues, %d items from %s", len(self.queues),
                 sum(len(q.items) for q in self.queues.values()), self.data_dir)

    def queue(self, name_bytes):
        """The queue for a request token, created on first reference."""
        q = self.by_bytes.get(name_bytes)
        if q is None:
            name = name_bytes.decode("utf-8", "surrogateescape")
            if not proto.valid_queue_name(name):
                raise proto.ProtocolError("bad queue name")
            q = self.queues.get(name) or self._create(name)
            self.by_bytes[name_bytes] = q
        return q

    def _create(self, name):
        q = Queue(name, os.path.join(self.data_dir, name), self.config.for_queue(name),
                  self.touched)
        self.queues[name] = q
        self.by_bytes[q.name_bytes] = q
        q.children = self.fanout.setdefault(name, [])
        if "+" in name:
            self.fanout.setdefault(name.split("+", 1)[0], []).append(q)
        return q

    def delete(self, name):
        q = self.queues.pop(name, None)
        if q is None:
            return
        self.by_bytes.pop(q.name_bytes, None)
        # self.fanout[name] stays: its children still exist and a re-created parent
        # must keep feeding them
        if "+" in name:
            siblings = self.fanout.get(name.split("+", 1)[0], [])
            if q in siblings:
                siblings.remove(q)
        q.deleted = True
        self.touched.discard(q)
        q.journal.remove(self.syncer.close_fd)
        q.wake_all()

    def store(self, q, data, exptime, now_ms):
        record = jr.encode_add(data, now_ms, proto.expiry_ms(exptime, now_ms))
        size = len(data)
        ok = q.add(record, size, now_ms)
        for child in q.children:
            child.add(record, size, now_ms)
        return ok

    def reload(self):
        config = load_config(self.config_path, self.config.default["max_item_bytes"])
        self.config = config
        for name, q in self.queues.items():
            q.config = config.for_queue(name)

    # -- journal writes
    def write_pending(self):
        """Write every buffered journal record (one os.write per journal).  True if any."""
        if not self.touched:
            return False
        touched = list(self.touched)
        self.touched.clear()
        for q in touched:
            q.journal.write()
        for q in touched:
            q.maintain(self.syncer.close_fd)
        return True

    # -- stats
    def stats_lines(self):
        now = time.time()
        now_ms = int(now * 1000)
        c = self.counters
        qs = list(self.queues.values())
        lines = [("uptime", int(now - self.started)), ("time", int(now)),
                 ("version", VERSION),
                 ("curr_items", sum(len(q.items) for q in qs)),
                 ("total_items", sum(q.total_items for q in qs)),
                 ("bytes", sum(q.bytes for q in qs))]
        lines += [(k, c[k]) for k in ("curr_connections", "total_connections", "cmd_get",
                                      "cmd_set", "cmd_peek", "get_hits", "get_misses")]
        for q in qs:
            lines += [("queue_%s_%s" % (q.name, k), v) for k, v in q.stats(now_ms)]
        return b"".join(b"STAT %s %s\r\n" % (k.encode("utf-8", "surrogateescape"),
                                            str(v).encode()) for k, v in lines) + END

    def dump_stats(self, names):
        now_ms = int(time.time() * 1000)
        out = []
        for name in names or list(self.queues):
            q = self.queues.get(name)
            if q is None:
                continue
            out.append("queue '%s' {" % name)
            out += ["  %s=%s" % kv for kv in q.stats(now_ms)]
            out.append("}")
        text = "".join(line + "\r\n" for line in out)
        return text.encode("utf-8", "surrogateescape") + END

    def request_stop(self):
        if not self.stop_event.ready():
            self.stop_event.send()


# ---- one client connection -------------------------------------------------------------

class Connection:
    """Reads, executes and answers one client's commands; owns its open reads."""

    def __init__(self, server, sock):
        self.server = server
        self.sock = sock
        self.out = []
        self.open = {}                # Queue -> deque of xids, oldest first
        self.skip = 0                 # bytes of an oversized data block still to discard
        self.more_input = False       # unprocessed bytes follow the current command
        self.now_ms = 0

    def run(self):
        counters = self.server.counters
        counters["curr_connections"] += 1
        counters["total_connections"] += 1
        try:
            self._loop()
        except (ConnectionGone, CloseConnection, OSError):
            pass
        except Exception:
            log.exception("connection failed")
        finally:
            counters["curr_connections"] -= 1
            self._cleanup()

    def _loop(self):
        chunks, have, need = [], 0, 1
        recv = self.sock.recv
        while True:
            chunk = recv(RECV_BYTES)
            if not chunk:
                return
            if self.skip:
                chunk = self._discard(chunk)
                if not chunk:
                    continue
            chunks.append(chunk)
            have += len(chunk)
            # PERF: a big item arriving in many recvs is joined once, not re-copied per recv.
            if have < need:
                continue
            buf = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            try:
                pos, need = self.process(buf)
            except CloseConnection:
                self.flush()      # the final reply (CLIENT_ERROR, ERROR), then close
                return
            rest = buf[pos:]
            chunks, have = ([rest], len(rest)) if rest else ([], 0)
            self.flush()

    def _discard(self, chunk):
        n = min(self.skip, len(chunk))
        self.skip -= n
        return chunk[n:]

    def flush(self):
        """Journal writes for the batch, then (sync 0) the shared fsync, then one sendall."""
        server = self.server
        if server.write_pending() and server.sync_ms == 0:
            server.syncer.wait_durable()
        if self.out:
            data = b"".join(self.out)
            self.out.clear()
            self.sock.sendall(data)

    def _cleanup(self):
        """Disconnect: every open read goes back to its queue's head, in opening order."""
        for q, xids in self.open.items():
            for xid in reversed(xids):
                q.unremove(xid)
        self.open.clear()
        try:
            self.server.write_pending()
        except OSError:
            log.exception("journal write at disconnect failed")
        try:
            self.sock.close()
        except OSError:
            pass

    # -- parsing
    def process(self, buf):
        """Execute every complete command in `buf`.  Returns (bytes consumed, bytes needed
        before calling again)."""
        pos, n = 0, len(buf)
        self.now_ms = int(time.time() * 1000)
        max_line = proto.MAX_LINE_BYTES
        try:
            while pos < n:
                nl = buf.find(b"\n", pos, pos + max_line + 1)
                if nl < 0:
                    if n - pos > max_line:
                        self._client_error("line too long")
                    return pos, n - pos + 1
                parts = proto.split_request(buf[pos:nl])
                if parts[0] == b"set" or parts[0] in OTHER_STORAGE:
                    end = self.do_set(buf, parts, nl + 1)
                    if end < 0:
                        return pos, -end - pos
                    pos = end
                    continue
                pos = nl + 1
                self.more_input = pos < n
                handler = COMMANDS.get(parts[0])
                if handler is None:
                    self._client_error("unknown command")
                handler(self, parts)
        except proto.ProtocolError as exc:
            self.out.append(b"CLIENT_ERROR %s\r\n" % str(exc).encode())
            raise CloseConnection() from None
        except CloseConnection:
            raise
        return pos, 1

    def _client_error(self, text):
        raise proto.ProtocolError(text)

    def _close_with(self, reply):
        """Answer `reply` (sent with the rest of the batch), then close."""
        self.out.append(reply)
        raise CloseConnection()

    # -- set
    def do_set(self, buf, parts, start):
        """Returns the end of the data block, or -(total bytes needed) if incomplete."""
        if len(parts) < 5:
            self._client_error("bad set line")
        try:
            size = int(parts[4])
        except ValueError:
            self._client_error("bad data length")
        if size < 0:
            self._client_error("bad data length")
        end = start + size
        if size > self.server.config.buffer_cap:
            return self._set_too_big(buf, end)
        if end + 2 > len(buf):
            return -(end + 2)
        if buf[end:end + 2] != b"\r\n":
            self._client_error("bad data chunk")
        if parts[0] != b"set":
            # add/replace/append/prepend/cas: block consumed so the stream stays in sync
            self.out.append(b"CLIENT_ERROR command not supported\r\n")
            return end + 2
        self.server.counters["cmd_set"] += 1
        try:
            flags, exptime = int(parts[2]), int(parts[3])
        except ValueError:
            self.out.append(b"CLIENT_ERROR bad flags or expiry\r\n")
            return end + 2
        del flags  # parsed for validation, never stored (Kestrel drops flags too)
        q = self.server.queue(parts[1])
        ok = self.server.store(q, buf[start:end], exptime, self.now_ms)
        self.out.append(STORED if ok else NOT_STORED)
        return end + 2

    def _set_too_big(self, buf, end):
        """Larger than any queue accepts: discard the block as it streams in, NOT_STORED."""
        self.server.counters["cmd_set"] += 1
        self.out.append(NOT_STORED)
        if end + 2 <= len(buf):
            return end + 2
        self.skip = end + 2 - len(buf)
        return len(buf)

    # -- get
    def do_get(self, parts):
        if len(parts) < 2 or not parts[1]:
            self._client_error("missing queue name")
        req = proto.parse_get_key(parts[1].decode("utf-8", "surrogateescape"))
        q = self.server.queue(req.name.encode("utf-8", "surrogateescape"))
        if req.close:
            self._confirm_oldest(q)
            if not req.open:
                self.out.append(END)
                return
        elif req.abort:
            self._abort_oldest(q)
            self.out.append(END)
            return
        opened = self.open.get(q)
        if opened:
            if req.open and len(opened) >= q.config.max_open_transactions:
                self._close_with(ERROR)
            if not req.open and not req.peek:
                self._close_with(ERROR)
        self._get(q, req)

    def _get(self, q, req):
        counters = self.server.counters
        counters["cmd_peek" if req.peek else "cmd_get"] += 1
        record = self._attempt(q, req)
        if record is None and req.timeout_ms:
            record = self._wait(q, req)
        if record is None:
            counters["get_misses"] += 1
            self.out.append(END)
            return
        counters["get_hits"] += 1
        self.out.append(b"VALUE %s 0 %d\r\n" % (q.name_bytes, jr.item_size(record)))
        self.out.append(memoryview(record)[jr.DATA_OFFSET:])
        self.out.append(b"\r\nEND\r\n")

    def _attempt(self, q, req):
        if q.deleted:
            return None
        if req.peek:
            return q.peek(self.now_ms)
        if not req.open:
            return q.take(self.now_ms)
        got = q.open_head(self.now_ms)
        if got is None:
            return None
        self.open.setdefault(q, collections.deque()).append(got[0])
        return got[1]

    def _wait(self, q, req):
        """Block until an item arrives, the timeout passes, or the client goes away."""
        self.flush()   # earlier replies of this batch must not wait behind the block
        deadline = time.monotonic() + req.timeout_ms / 1000.0
        fileno = None if self.more_input else self.sock.fileno()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            waiter = Waiter(greenlet.getcurrent(), req.peek)
            waiting = q.waiting(req.peek)
            waiting.append(waiter)
            reason = None
            try:
                reason = park(waiter, remaining, fileno)
            finally:
                waiter.done = True
                if waiter in waiting:
                    waiting.remove(waiter)
                elif reason != WOKEN and q.items:
                    q.wake()    # we were woken but timed out/left first: pass it on
            if reason == READABLE:
                if self._peer_closed():
                    raise ConnectionGone()
                fileno = None     # pipelined input is waiting; stop watching the socket
                continue
            if reason == GONE:
                raise ConnectionGone()
            self.now_ms = int(time.time() * 1000)
            if reason == WOKEN:
                record = waiter.record or self._attempt(q, req)
                if record is not None:
                    return record

    def _peer_closed(self):
        try:
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def _confirm_oldest(self, q):
        xids = self.open.get(q)
        if xids:
            q.confirm(xids.popleft())
            if not xids:
                del self.open[q]

    def _abort_oldest(self, q):
        xids = self.open.get(q)
        if not xids:
            log.debug("abort on %s with nothing open", q.name)
            return
        q.unremove(xids.popleft())
        if not xids:
            del self.open[q]

    # -- admin commands
    def do_delete(self, parts):
        if len(parts) < 2 or not parts[1]:
            self._client_error("missing queue name")
        name = parts[1].decode("utf-8", "surrogateescape")
        if not proto.valid_queue_name(name):
            self._client_error("bad queue name")
        self.server.delete(name)
        self.out.append(DELETED)

    def do_flush(self, parts):
        if len(parts) < 2 or not parts[1]:
            self._client_error("missing queue name")
        name = parts[1].decode("utf-8", "surrogateescape")
        q = self.server.queues.get(name)
        if q is not None:
            q.flush()
        self.out.append(END)

    def do_flush_all(self, parts):
        for q in list(self.server.queues.values()):
            q.flush()
        self.out.append(b"Flushed all queues.\r\n")

    def do_flush_expired(self, parts):
        if len(parts) < 2 or not parts[1]:
            self._client_error("missing queue name")
        q = self.server.queues.get(parts[1].decode("utf-8", "surrogateescape"))
        n = q.expire_head(self.now_ms) if q is not None else 0
        self.out.append(b"%d\r\n" % n)

    def do_flush_all_expired(self, parts):
        n = sum(q.expire_head(self.now_ms) for q in list(self.server.queues.values()))
        self.out.append(b"%d\r\n" % n)

    def do_stats(self, parts):
        self.out.append(self.server.stats_lines())

    def do_dump_stats(self, parts):
        names = [p.decode("utf-8", "surrogateescape") for p in parts[1:] if p]
        self.out.append(self.server.dump_stats(names))

    def do_version(self, parts):
        self.out.append(b"VERSION %s\r\n" % VERSION.encode())

    def do_reload(self, parts):
        try:
            self.server.reload()
        except (OSError, ValueError) as exc:
            log.error("reload failed, keeping the old config: %s", exc)
            self.out.append(ERROR)
            return
        log.info("config reloaded from %s", self.server.config_path)
        self.out.append(b"Reloaded config.\r\n")

    def do_shutdown(self, parts):
        log.info("shutdown requested by a client")
        self.server.request_stop()
        raise CloseConnection()

    def do_quit(self, parts):
        raise CloseConnection()


OTHER_STORAGE = frozenset((b"add", b"replace", b"append", b"prepend", b"cas"))
COMMANDS = {
    b"get": Connection.do_get, b"gets": Connection.do_get,
    b"delete": Connection.do_delete, b"flush": Connection.do_flush,
    b"flush_all": Connection.do_flush_all, b"flush_expired": Connection.do_flush_expired,
    b"flush_all_expired": Connection.do_flush_all_expired,
    b"stats": Connection.do_stats, b"dump_stats": Connection.do_dump_stats,
    b"version": Connection.do_version, b"reload": Connection.do_reload,
    b"shutdown": Connection.do_shutdown, b"quit": Connection.do_quit,
}


# ---- process entry point ---------------------------------------------------------------

def _accept_loop(server, listener):
    while True:
        try:
            sock, _addr = listener.accept()
        except OSError:
            if server.stop_event.ready():
                return
            log.exception("accept failed")
            eventlet.sleep(0.1)   # e.g. EMFILE: back off instead of spinning
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        eventlet.spawn_n(Connection(server, sock).run)


def _install_signal_handlers(server):
    """Signal handlers only write to a pipe; a green thread turns that into a stop."""
    r, w = os.pipe()
    os.set_blocking(w, False)

    def handler(signum, _frame):
        # posix.write: the green os.write would try to switch inside the hub.
        try:
            posix.write(w, b"x")
        except OSError:
            pass

    def watch():
        hubs.trampoline(r, read=True)
        log.info("signal received, stopping")
        server.request_stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    eventlet.spawn_n(watch)


def main(args):
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    max_item = args.max_item_bytes if args.max_item_bytes is not None \
        else DEFAULT_MAX_ITEM_BYTES
    try:
        config = load_config(args.config, max_item)
    except (OSError, ValueError) as exc:
        log.error("bad --config %s: %s", args.config, exc)
        return 2
    if args.sync_ms < 0 or max_item < 0:
        log.error("--sync-ms and --max-item-bytes must be >= 0")
        return 2
    server = QueueServer(os.path.abspath(args.data), config, args.sync_ms, args.config)
    _install_signal_handlers(server)     # a signal during a long replay stops after it
    server.load()
    try:
        listener = eventlet.listen((args.host, args.port), backlog=1024)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", args.host, args.port, exc)
        return 1
    server.syncer.start()
    eventlet.spawn_n(_accept_loop, server, listener)
    log.info("ingest queue %s listening on %s:%d (data %s, sync-ms %d)", VERSION,
             args.host, listener.getsockname()[1], server.data_dir, args.sync_ms)
    server.stop_event.wait()
    listener.close()
    eventlet.sleep(0.05)   # grace period, like Kestrel's: in-flight replies go out first
    server.write_pending()
    server.syncer.sync_all_now()
    log.info("journals synced, exiting")
    return 0
