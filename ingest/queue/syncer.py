"""The fsync policy of `ingest queue`: when journal writes become durable.

What it is for: fsyncing dirty journals in a worker thread (eventlet's tpool), so the
hub keeps serving while the disk works.  --sync-ms N > 0: a green thread syncs every N
ms (an OS crash may lose up to N ms of acknowledged items).  --sync-ms 0: group commit,
a connection calls `wait_durable()` after writing its batch and before replying.

A journal renamed into place by a rewrite also needs its directory fsynced before what
is appended to it counts as durable: a round that finds such a journal fsyncs the data
directory too.  Descriptors a journal no longer uses are closed in the worker thread as
well: closing the last one of a big replaced file frees its blocks, which takes time.

What it must not do: write journal records (the server does, before anything waits
here), or carry on after a failed fsync: the kernel may have dropped the dirty pages,
so the process exits and the restart replays the journals (journal.fatal_io_error).
"""
import logging
import os
import posix

import eventlet
import eventlet.event
from eventlet import tpool

from ingest.fileio import fsync_dir
from ingest.queue import journal as jr

log = logging.getLogger("ingest.queue")


class Syncer:
    """fsyncs dirty journals in a worker thread (tpool) so the hub keeps serving.

    sync_ms > 0: a green thread syncs every sync_ms.  sync_ms == 0: group commit —
    connections call `wait_durable()` after writing; one round fsyncs every dirty journal
    and releases every connection that was waiting when it started.
    """

    def __init__(self, journals, sync_ms, data_dir):
        self.journals = journals      # callable -> iterable of Journal
        self.sync_ms = sync_ms
        self.data_dir = data_dir
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
            close_later(fd)

    def _round(self):
        fds, directory = [], None
        for j in self.journals():
            if j.dirty and j.fd is not None:
                j.dirty = False
                fds.append(j.fd)
            if j.dir_dirty:
                j.dir_dirty = False
                directory = self.data_dir
        if not fds and directory is None:
            return
        self.busy = True
        try:
            failed = tpool.execute(_fsync_all, fds, directory)
        finally:
            self.busy = False
            retired, self.retired = self.retired, []
            for fd in retired:
                close_later(fd)
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
        directory = None
        for j in self.journals():
            if j.fd is not None:
                j.write()
                j.fsync()
                j.dirty = False
            if j.dir_dirty:
                j.dir_dirty, directory = False, self.data_dir
        if directory is not None:
            fsync_dir(directory)


def _fsync_all(fds, directory):
    """Runs in a real thread: no logging (its locks are green), errors are returned."""
    failed = []
    for fd in fds:
        try:
            os.fsync(fd)
        except OSError as exc:
            failed.append("fd %d: %s" % (fd, exc))
    if directory is not None:
        try:
            fsync_dir(directory)
        except OSError as exc:
            failed.append("directory %s: %s" % (directory, exc))
    return failed


def close_later(fd):
    """Close `fd` in a worker thread (the C close: the green one talks to the hub)."""
    eventlet.spawn_n(tpool.execute, posix.close, fd)
