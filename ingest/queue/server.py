"""The state of one `ingest queue` process: its queues by name and what they share.

What it is for: `QueueServer` creates queues on first use (up to --max-queues) and loads
them from the data directory at start (replay.py), links fanout children (`parent+child`
gets every item stored on `parent`), stores items, deletes queues, reloads the --config
file, writes the journal records of a batch (`write_pending`), and formats STATS /
DUMP_STATS.  It owns the Syncer, the read-ahead and the compactor (the long file work,
off the event loop), the server counters and the stop flag, and is the `owner` a Queue
asks for read-ahead, compaction and closing descriptors.

What it must not do: read or write sockets, or parse requests (connection.py does);
change a queue except through the Queue's own methods.
"""
import logging
import os
import time

import eventlet.event

from ingest import __version__
from ingest.kestrel import protocol as proto
from ingest.queue import journal as jr
from ingest.queue import replay
from ingest.queue.compactor import Compactor
from ingest.queue.options import load_config
from ingest.queue.readahead import ReadAhead
from ingest.queue.store import Queue
from ingest.queue.syncer import Syncer

log = logging.getLogger("ingest.queue")

VERSION = "2.4.1-ingest-%s" % __version__
COUNTERS = ("curr_connections", "total_connections", "cmd_get", "cmd_set", "cmd_peek",
            "get_hits", "get_misses")


class QueueRefused(Exception):
    """A queue cannot be created (too many queues, or its journal cannot be created):
    the request is answered SERVER_ERROR <message>."""


class QueueServer:
    """All queues by name, fanout links, server counters, the syncer and the stop flag."""

    def __init__(self, data_dir, config, sync_ms, config_path=None, max_item_bytes=None,
                 max_queues=1000):
        self.data_dir = data_dir
        self.config = config
        self.config_path = config_path
        self.max_item_bytes = max_item_bytes if max_item_bytes is not None else \
            config.default["max_item_bytes"]
        self.max_queues = max_queues
        self.queues = {}              # name (str) -> Queue
        self.by_bytes = {}            # name (bytes) -> Queue: the hot-path lookup
        self.fanout = {}              # parent name -> list of child Queues
        self.touched = set()          # queues with journal records not yet written
        self.syncer = Syncer(lambda: [q.journal for q in self.queues.values()], sync_ms,
                             data_dir)
        self.readahead = ReadAhead()
        self.compactor = Compactor(self.syncer.close_fd, sync_ms)
        self.sync_ms = sync_ms
        self.started = time.time()
        self.stop_event = eventlet.event.Event()
        self.counters = dict.fromkeys(COUNTERS, 0)

    def start(self):
        """The green threads of the long file work (after load, before accepting)."""
        self.syncer.start()
        self.readahead.start()
        self.compactor.start()

    # -- what a Queue asks of its owner
    def want_refill(self, q):
        self.readahead.want(q)

    def want_compaction(self, q, force=False):
        self.compactor.want(q, force)

    def close_fd(self, fd):
        self.syncer.close_fd(fd)

    # -- queues
    def load(self):
        """Replay every journal in the data directory (blocking: before listening)."""
        os.makedirs(self.data_dir, exist_ok=True)
        for entry in os.listdir(self.data_dir):
            if "~~" in entry:             # an interrupted rewrite; the original is intact
                os.unlink(os.path.join(self.data_dir, entry))
        for entry in sorted(os.listdir(self.data_dir)):
            path = os.path.join(self.data_dir, entry)
            if not os.path.isfile(path) or not proto.valid_queue_name(entry):
                continue
            loaded = replay.load(path, self.config.for_queue(entry).max_memory_bytes)
            self._create(entry).restore(loaded)   # Journal opened after a torn-tail cut
        self.write_pending()
        qs = self.queues.values()
        log.info("loaded %d queues, %d items (%d in memory) from %s", len(self.queues),
                 sum(q.count() for q in qs), sum(len(q.items) for q in qs), self.data_dir)

    def queue(self, name_bytes):
        """The queue for a request token, created on first reference."""
        q = self.by_bytes.get(name_bytes)
        if q is None:
            name = name_bytes.decode("utf-8", "surrogateescape")
            if not proto.valid_queue_name(name):
                raise proto.ProtocolError("bad queue name")
            q = self.queues.get(name)
            if q is None:
                q = self._new_queue(name)
            self.by_bytes[name_bytes] = q
        return q

    def _new_queue(self, name):
        if len(self.queues) >= self.max_queues:
            log.warning("queue %s refused: %d queues exist (--max-queues)", name,
                        len(self.queues))
            raise QueueRefused("too many queues (max %d)" % self.max_queues)
        try:
            return self._create(name)
        except OSError as exc:
            log.error("queue %s cannot be created: %s", name, exc)
            raise QueueRefused("cannot create queue: %s" % (exc.strerror or exc)) from None

    def _create(self, name):
        q = Queue(name, jr.Journal(os.path.join(self.data_dir, name)),
                  self.config.for_queue(name), self)
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

    def store_many(self, q, datas, exptime, now_ms):
        """store() of each of `datas` in turn: the list of their outcomes."""
        if q.children and any(c.waiters or c.peekers for c in [q] + q.children):
            # Readers blocked on a fanout parent and its children are woken item by
            # item, parent then children, as store() does: not all of one queue first.
            return [self.store(q, data, exptime, now_ms) for data in datas]
        records = jr.encode_adds(datas, now_ms, proto.expiry_ms(exptime, now_ms))
        sizes = list(map(len, datas))
        oks = q.add_many(records, sizes, now_ms)
        for child in q.children:
            child.add_many(records, sizes, now_ms)
        return oks

    def reload(self):
        config = load_config(self.config_path, self.max_item_bytes)
        self.config = config
        for name, q in self.queues.items():
            q.options = config.for_queue(name)

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
            try:
                q.maintain()
            except OSError as exc:      # a failed truncate: the journal is still whole
                log.error("queue %s: journal maintenance failed: %s", q.name, exc)
        return True

    # -- stats
    def stats_lines(self):
        now = time.time()
        now_ms = int(now * 1000)
        c = self.counters
        qs = list(self.queues.values())
        lines = [("uptime", int(now - self.started)), ("time", int(now)),
                 ("version", VERSION),
                 ("curr_items", sum(q.count() for q in qs)),
                 ("total_items", sum(q.total_items for q in qs)),
                 ("bytes", sum(q.bytes for q in qs))]
        lines += [(k, c[k]) for k in COUNTERS]
        for q in qs:
            lines += [("queue_%s_%s" % (q.name, k), v) for k, v in q.stats(now_ms)]
        return proto.stats_reply(lines)

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
        return text.encode("utf-8", "surrogateescape") + proto.END_REPLY

    def request_stop(self):
        if not self.stop_event.ready():
            self.stop_event.send()
