"""One client connection of `ingest queue`: read, execute, journal, reply.

What it is for: `Connection.run` reads big chunks, executes every complete command in
the buffer (COMMANDS maps each command word to its handler), then `flush`es the batch:
the journal records first (one write per touched journal), then under --sync-ms 0 the
shared fsync, then every reply in one sendall.  It owns the reliable reads opened on it
and hands them back to their queues when the client goes away.

What it must not do: send a reply before the journal records of its batch are written;
leave a request unanswered once it changed a queue (a request it cannot serve is
answered SERVER_ERROR or CLIENT_ERROR and the connection closed before the next one is
read); buffer without bound (request lines are capped at protocol.MAX_LINE_BYTES and a data
block larger than any queue accepts is discarded as it streams in, never allocated);
let one client's bad request affect another (it gets CLIENT_ERROR and this connection
closes).  Reply bytes come from ingest/kestrel/protocol.py.
"""
import collections
import logging
import re
import socket
import time

import greenlet

from ingest.kestrel import protocol as proto
from ingest.kestrel.protocol import (CRLF, DELETED_REPLY, END_REPLY, ERROR_REPLY,
                                     FLUSHED_ALL_REPLY, NOT_STORED_REPLY, RELOADED_REPLY,
                                     STORED_REPLY, UNSUPPORTED_STORAGE, VALUE_HEADER,
                                     VALUE_TRAILER)
from ingest.queue import journal as jr
from ingest.queue.server import VERSION, QueueRefused
from ingest.queue.waiters import GONE, READABLE, WOKEN, Waiter, park

log = logging.getLogger("ingest.queue")

# PERF: one 256 KiB read carries a whole client batch (100 x 1 KiB sets = 103 KB): server
# CPU 4.9-5.0 us/item vs 5.3-5.7 us/item with 64 KiB reads (bench/queue_server_bench.py).
RECV_BYTES = 256 * 1024
# Matchers of set lines by their head (`set <queue> <flags> <expiry>`), at most 255 bytes
# (longer ones are stored set by set): a client writes to a few queues, so a few are kept.
_SET_LINES, _SET_LINES_KEPT, _SET_HEAD_MAX = {}, 64, 255


def _set_line(head):
    """The match() of a line `head`, a space, the data length in ASCII digits, any \r,
    then \n: what _plain_sets takes (group 1: the length)."""
    pattern = _SET_LINES.get(head)
    if pattern is None:
        if len(_SET_LINES) >= _SET_LINES_KEPT:
            _SET_LINES.clear()
        pattern = _SET_LINES[head] = re.compile(re.escape(head) + rb" ([0-9]+)\r*\n").match
    return pattern


class ConnectionGone(Exception):
    """The client went away while its get was blocked."""


class CloseConnection(Exception):
    """Send what is buffered (e.g. CLIENT_ERROR) and close."""


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
        except (ConnectionGone, CloseConnection):
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
            try:
                chunk = recv(RECV_BYTES)
            except OSError:
                raise ConnectionGone() from None
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
            try:
                self.sock.sendall(data)
            except OSError:
                raise ConnectionGone() from None

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
                if buf.startswith(b"set ", pos):
                    start = pos
                    pos, need = self._plain_sets(buf, pos, nl)
                    if need:
                        return pos, need
                    if pos != start:
                        continue
                parts = proto.split_request(buf[pos:nl])
                if parts[0] == b"set" or parts[0] in UNSUPPORTED_STORAGE:
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
            self.out.append(proto.client_error(str(exc)))
            raise CloseConnection() from None
        except QueueRefused as exc:
            self.out.append(proto.server_error(str(exc)))
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
    def _plain_sets(self, buf, pos, nl):
        """Store the run of sets starting at `pos` (its line ends at `nl`) whose lines
        are all `set <queue> <flags> <expiry> <length>`, the same but for the length,
        with digits where numbers go and each data block whole.  Returns the position
        after the last one stored (`pos` when none was: do_set decides that line), and
        the bytes needed from there when the run stopped at a block not all received.

        PERF: a client's batch is such a run.  Parsed once per run instead of by
        split_request, three int()s and a queue lookup per set, and stored with
        store_many: 31,139 -> 17,246 instructions per set of a worker's 50-set batch
        (python -m bench.instructions --queue).  Each line after the first is then
        matched whole by one regular expression made for the run's head (_set_line)
        instead of by six find/startswith/strip calls: 17,561 -> 14,459 with the bulk
        backlog path of Queue.add_many.  tests/unit/test_queue_set_runs.py checks that
        it does what do_set would have done, set by set."""
        sp = buf.rfind(b" ", pos, nl)
        head = buf[pos:sp]
        parts = head.split(b" ")
        if len(parts) != 4 or not (parts[2].isdigit() and parts[3].isdigit()):
            return pos, 0
        expiry = int(parts[3])
        if expiry > proto.MAX_EXPTIME_S:
            return pos, 0
        length = buf[sp + 1:nl].rstrip(b"\r")
        if not length.isdigit():
            return pos, 0
        cap, end_of_buf = self.server.config.buffer_cap, len(buf)
        line_limit = proto.MAX_LINE_BYTES + 1       # the line and its \n, as process() reads
        start, match = nl + 1, None
        datas, need = [], 0
        while True:
            end = start + int(length)
            if end - start > cap:
                break
            if end + 2 > end_of_buf:
                need = end + 2 - pos
                break
            if not buf.startswith(CRLF, end):
                break
            datas.append(buf[start:end])
            pos = end + 2
            if match is None:
                # A pattern is made only for a run (a second set to the same head), and
                # only for a head of usual length: compiling one took 108 us, about 200
                # times a line's match.
                if len(head) > _SET_HEAD_MAX or not buf.startswith(head, pos):
                    break
                match = _set_line(head)
            line = match(buf, pos)
            if line is None:
                break
            start = line.end()
            if start - pos > line_limit:
                break
            length = line[1]
        if datas:
            self._store_run(parts[1], datas, expiry)
        return pos, need

    def _store_run(self, name, datas, expiry):
        """Store a run's data blocks on queue `name`, counted and answered as do_set
        would each of them."""
        server = self.server
        # Counted as do_set counts: the first set before its queue is looked up (which
        # may refuse the name), the others once it was.
        server.counters["cmd_set"] += 1
        q = server.queue(name)
        oks = server.store_many(q, datas, expiry, self.now_ms)
        server.counters["cmd_set"] += len(datas) - 1
        self.out.extend([STORED_REPLY if ok else NOT_STORED_REPLY for ok in oks])

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
        if buf[end:end + 2] != CRLF:
            self._client_error("bad data chunk")
        if parts[0] != b"set":
            # add/replace/append/prepend/cas: block consumed so the stream stays in sync
            self.out.append(proto.client_error("command not supported"))
            return end + 2
        self.server.counters["cmd_set"] += 1
        try:
            flags, exptime = int(parts[2]), int(parts[3])
        except ValueError:
            exptime = None
        if exptime is None or exptime > proto.MAX_EXPTIME_S:
            self.out.append(proto.client_error("bad flags or expiry"))
            return end + 2
        del flags  # parsed for validation, never stored (Kestrel drops flags too)
        q = self.server.queue(parts[1])
        ok = self.server.store(q, buf[start:end], exptime, self.now_ms)
        self.out.append(STORED_REPLY if ok else NOT_STORED_REPLY)
        return end + 2

    def _set_too_big(self, buf, end):
        """Larger than any queue accepts: discard the block as it streams in, NOT_STORED."""
        self.server.counters["cmd_set"] += 1
        self.out.append(NOT_STORED_REPLY)
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
                self.out.append(END_REPLY)
                return
        elif req.abort:
            self._abort_oldest(q)
            self.out.append(END_REPLY)
            return
        opened = self.open.get(q)
        if opened:
            if req.open and len(opened) >= q.options.max_open_transactions:
                self._close_with(ERROR_REPLY)
            if not req.open and not req.peek:
                self._close_with(ERROR_REPLY)
        self._get(q, req)

    def _get(self, q, req):
        counters = self.server.counters
        counters["cmd_peek" if req.peek else "cmd_get"] += 1
        record = self._attempt(q, req)
        if record is None and req.timeout_ms:
            record = self._wait(q, req)
        if record is None:
            counters["get_misses"] += 1
            self.out.append(END_REPLY)
            return
        counters["get_hits"] += 1
        self.out.append(VALUE_HEADER % (q.name_bytes, jr.item_size(record)))
        self.out.append(memoryview(record)[jr.DATA_OFFSET:])
        self.out.append(VALUE_TRAILER)

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
                elif reason != WOKEN and q.count():
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
        self.out.append(DELETED_REPLY)

    def do_flush(self, parts):
        if len(parts) < 2 or not parts[1]:
            self._client_error("missing queue name")
        name = parts[1].decode("utf-8", "surrogateescape")
        q = self.server.queues.get(name)
        if q is not None:
            q.flush()
        self.out.append(END_REPLY)

    def do_flush_all(self, parts):
        for q in list(self.server.queues.values()):
            q.flush()
        self.out.append(FLUSHED_ALL_REPLY)

    def do_flush_expired(self, parts):
        if len(parts) < 2 or not parts[1]:
            self._client_error("missing queue name")
        q = self.server.queues.get(parts[1].decode("utf-8", "surrogateescape"))
        n = q.expire_head(self.now_ms) if q is not None else 0
        self.out.append(proto.count_reply(n))

    def do_flush_all_expired(self, parts):
        n = sum(q.expire_head(self.now_ms) for q in list(self.server.queues.values()))
        self.out.append(proto.count_reply(n))

    def do_stats(self, parts):
        self.out.append(self.server.stats_lines())

    def do_dump_stats(self, parts):
        names = [p.decode("utf-8", "surrogateescape") for p in parts[1:] if p]
        self.out.append(self.server.dump_stats(names))

    def do_version(self, parts):
        self.out.append(proto.version_reply(VERSION))

    def do_reload(self, parts):
        try:
            self.server.reload()
        except (OSError, ValueError) as exc:
            log.error("reload failed, keeping the old config: %s", exc)
            self.out.append(ERROR_REPLY)
            return
        log.info("config reloaded from %s", self.server.config_path)
        self.out.append(RELOADED_REPLY)

    def do_shutdown(self, parts):
        log.info("shutdown requested by a client")
        self.server.request_stop()
        raise CloseConnection()

    def do_quit(self, parts):
        raise CloseConnection()


COMMANDS = {
    b"get": Connection.do_get, b"gets": Connection.do_get,
    b"delete": Connection.do_delete, b"flush": Connection.do_flush,
    b"flush_all": Connection.do_flush_all, b"flush_expired": Connection.do_flush_expired,
    b"flush_all_expired": Connection.do_flush_all_expired,
    b"stats": Connection.do_stats, b"dump_stats": Connection.do_dump_stats,
    b"version": Connection.do_version, b"reload": Connection.do_reload,
    b"shutdown": Connection.do_shutdown, b"quit": Connection.do_quit,
}
