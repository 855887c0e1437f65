"""Reading backlog items back before they are needed, in a worker thread.

What it is for: the read side of read-behind.  When a queue with a backlog (items only in
its journal, backlog.py) drops below 3/4 of its memory bound it asks `want(q)`; one green
thread then reads the next piece of that journal with pread in eventlet's tpool and moves
the items into memory (Queue.fill), until the bound is reached again.  So a consumer
normally finds the next item in memory, and the hub never waits for the disk; only when
consumers outrun this does Queue read back on the loop itself.

What it must not do: change what a queue holds (only where its items live), or use bytes
read while the file changed under them: a read counts only if the journal's generation,
the queue's backlog and the end of its read buffer are still those it started from.
"""
import collections
import os
import posix

import eventlet
import eventlet.event
from eventlet import tpool

from ingest.queue import journal as jr


# PERF: items are moved into memory at most this many bytes at a time, then the loop
# serves others: moving a 1 MiB read took up to 4 ms of CPU (5-18 ms of wall clock on
# the loaded 2-core VM) in one go; 256 KiB steps keep each under about 1 ms of CPU.
STEP = 256 * 1024


class SerialWorker:
    """Queues asking for one kind of background work, served in the order they asked by
    one green thread (`work(q)`, defined by the subclass)."""

    def __init__(self):
        self.wanted = collections.OrderedDict()    # queues waiting, oldest request first
        self.kick = None

    def start(self):
        eventlet.spawn_n(self._loop)

    def _add(self, q):
        if q in self.wanted:
            return
        self.wanted[q] = None
        if self.kick is not None and not self.kick.ready():
            self.kick.send()

    def _loop(self):
        while True:
            if not self.wanted:
                self.kick = eventlet.event.Event()
                self.kick.wait()
                continue
            q, _ = self.wanted.popitem(last=False)
            self.work(q)

    def work(self, q):
        raise NotImplementedError


class ReadAhead(SerialWorker):
    """Refills the memory part of queues with a backlog (`want(q)`)."""

    def want(self, q):
        self._add(q)

    def work(self, q):
        try:
            self.fill(q)
        except OSError as exc:
            jr.fatal_io_error("reading back queue %s" % q.name, exc)

    @staticmethod
    def fill(q):
        """Read ahead for `q` until its memory part is full or its backlog is read."""
        backlog, bound = q.backlog, q.options.max_memory_bytes
        while backlog is not None and q.backlog is backlog and not q.deleted:
            before = backlog.pos
            q.fill(STEP)
            if q.backlog is not backlog or q.mem_cost() >= bound:
                return
            if backlog.pos != before:
                eventlet.sleep(0)      # let connections run between steps
                continue
            want = backlog.want(q.journal.size)
            if want is None:
                return
            generation = q.journal.generation
            data = tpool.execute(_pread_close, os.dup(q.journal.reader()), want[1], want[0])
            if q.deleted or q.journal.generation != generation or q.backlog is not backlog:
                return
            backlog.feed(want[0], data)


def _pread_close(fd, n, at):
    """Runs in a worker thread: the C calls, not eventlet's green ones."""
    try:
        return posix.pread(fd, n, at)
    finally:
        posix.close(fd)
