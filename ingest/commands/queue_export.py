"""`ingest queue export --data DIR --kestrel H:P,...`: move every item a queue server's
data directory holds into a cluster.

What it is for: a queue host lost for good leaves its data directory as the only copy of
what it held.  Copy that directory to any machine (or mount the disk there) and export
it: this starts the bundled queue server on DIR as a child process on a free loopback
port (it replays the journals as at any start; reads open at the crash go back to their
queues), drains every queue with reliable reads (the parallel Consumer) and puts each
batch into the cluster with put_many.  An item is confirmed on the child, which journals
its removal in DIR, only after a cluster server answered STORED; otherwise it is handed
back.  Then the child is stopped with SIGTERM (it syncs its journals).  Going through the
protocol keeps this independent of the journal format.

What it must not do: delete DIR or a file in it (a second run resumes: the removals of
moved items are journaled, so it sends again at most the batch in flight when the first
run stopped); confirm an item no cluster server stored; start a queue server on a
directory another process holds open (a queue server still running there) or on one
that does not look like a queue data directory (`ingest queue` would take any file
named like a queue for a journal and rewrite it); leave its child running (the child gets SIGTERM when this process
dies, PR_SET_PDEATHSIG); talk to anything but the cluster and its own child on loopback;
import eventlet.
"""
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from ingest.kestrel.client import Client
from ingest.kestrel.consumer import Consumer
from ingest.kestrel.errors import KestrelError, KestrelUnavailable
from ingest.kestrel.protocol import valid_queue_name

LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 600       # replaying a big directory takes a while
WAIT_MS = 300               # an empty queue is one that hands out nothing for this long
RETRY_S = 1.0               # between attempts while no cluster server takes items
PR_SET_PDEATHSIG = 1


class ExportError(Exception):
    """Stops the export; the message is the operator's one line."""


def _die_with_parent():
    """In the child, before exec: SIGTERM when the exporting process dies."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _free_port():
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


# ---- the directory ----------------------------------------------------------------------

def holders(directory):
    """Pids of other processes holding a file under `directory` open (Linux /proc;
    processes of other users are only seen by root)."""
    real = os.path.realpath(directory)
    found = set()
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]
    except OSError:
        return []
    for pid in pids:
        fd_dir = "/proc/%s/fd" % pid
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(os.path.join(fd_dir, fd))
            except OSError:
                continue
            if target == real or target.startswith(real + os.sep):
                found.add(int(pid))
                break
    return sorted(found)


def _queue_server_file(directory, entry):
    """What `ingest queue` keeps in its data directory: a journal per queue (named after
    it), `~~` leftovers of an interrupted rewrite or recovery, `.lock` (its flock) and
    `<queue>.damaged-<time>` copies of damaged journals (ingest/queue/replay.py)."""
    if "~~" in entry or entry == ".lock":
        return True
    name = entry.split(".damaged-", 1)[0]
    return valid_queue_name(name) and os.path.isfile(os.path.join(directory, entry))


def check_directory(directory):
    """The directory's real path, once it looks like an idle queue data directory (only
    what a queue server keeps there) and no process holds it open."""
    if not os.path.isdir(directory):
        raise ExportError("%s is not a directory" % directory)
    strangers = [e for e in sorted(os.listdir(directory))
                 if not _queue_server_file(directory, e)]
    if strangers:
        raise ExportError("%s does not look like a queue data directory (it holds %s; a"
                          " queue server keeps one journal file per queue, named after it,"
                          " its .lock and damaged copies, and nothing else)" % (directory, ", ".join(strangers[:5])))
    pids = holders(directory)
    if pids:
        raise ExportError("%s is in use by pid %s (a queue server still running on it?);"
                          " stop it, or export a copy" % (directory, ", ".join(map(str, pids))))
    return os.path.realpath(directory)


# ---- the child queue server -------------------------------------------------------------

class Child:
    """`ingest queue` on the directory, on a free loopback port, as a child process."""

    def __init__(self, directory):
        self.directory = directory
        self.popen = None
        self.address = None
        self.log = None
        self.told = False       # the log's tail was already shown in an error

    def start(self, timeout_s=START_TIMEOUT_S):
        for _attempt in range(3):
            port = _free_port()
            self.log = tempfile.TemporaryFile()
            self.popen = subprocess.Popen(
                [sys.executable, "-W", "ignore", "-m", "ingest", "queue", "--host", LOOPBACK,
                 "--port", str(port), "--data", self.directory, "--sync-ms", "100"],
                stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent)
            if self._wait_listening(port, time.monotonic() + timeout_s):
                self.address = "%s:%d" % (LOOPBACK, port)
                return self
            if self.popen.returncode != 1:   # 1: the port was taken meanwhile; try another
                break
        self.told = True
        raise ExportError("the queue server on %s %s:\n%s" % (
            self.directory, self.status("did not start listening in time"), self.tail()))

    def _wait_listening(self, port, deadline):
        while self.popen.poll() is None:
            try:
                socket.create_connection((LOOPBACK, port), timeout=0.5).close()
                return True
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    return False
                time.sleep(0.05)   # poll interval while it replays its journals
        return False

    def status(self, running="running, but not answering"):
        if self.popen is None or self.popen.poll() is None:
            return running
        return "exited with status %s" % self.popen.returncode

    def warnings(self):
        """The queue server's own WARNING, ERROR and CRITICAL lines (a damaged journal
        recovered at replay, a failed write), for the operator; [] when a failure
        message already quoted them."""
        if self.log is None or self.told:
            return []
        self.log.seek(0)
        return [line for line in self.log.read().decode("utf-8", "replace").splitlines()
                if " WARNING " in line or " ERROR " in line or " CRITICAL " in line]

    def tail(self, limit=2000):
        if self.log is None:
            return ""
        self.log.seek(0, os.SEEK_END)
        size = self.log.tell()
        self.log.seek(max(0, size - limit))
        return self.log.read().decode("utf-8", "replace").rstrip()

    def failure(self):
        """The error for a child that stopped answering (given a moment to exit)."""
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self.told = True
        return ExportError("the queue server on %s stopped answering (%s):\n%s"
                           % (self.directory, self.status(), self.tail()))

    def queues(self):
        """{queue: (items, open reads)} of every queue the child holds."""
        with Client([self.address], timeout_ms=10000) as client:
            stats = next(iter(client.stats().values()))
        if stats is None:
            raise self.failure()
        return {name: (q.get("items", 0), q.get("open_transactions", 0))
                for name, q in stats["queues"].items()}

    def stop(self, timeout_s=60):
        """SIGTERM (it writes and fsyncs its journals), then SIGKILL; the exit status."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        return self.popen.returncode


# ---- moving items -----------------------------------------------------------------------

class Mover:
    """Moves one queue at a time from the child into the cluster."""

    def __init__(self, child, servers, connections, give_up_s):
        self.child = child
        self.cluster = Client(servers)
        self.connections = connections
        self.give_up_s = give_up_s
        self.moved = 0           # items stored in the cluster and confirmed on the child
        self.lost = 0            # confirms that did not reach the child (sent again later)

    def close(self):
        self.cluster.close()

    def move(self, queue):
        """Every item of `queue` into the cluster; returns how many were moved."""
        consumer = Consumer([self.child.address], queue, connections=self.connections,
                            wait_ms=WAIT_MS, timeout_ms=10000)
        moved, idle = 0, 0
        try:
            while True:
                try:
                    batch = consumer.fetch()
                except KestrelUnavailable:
                    raise self.child.failure() from None
                if batch:
                    idle = 0
                    batch += self._more(consumer, len(batch))
                    moved += self._put(consumer, queue, batch)
                    continue
                items, _open = self.child.queues().get(queue, (0, 0))
                idle += 1
                if not items:
                    return moved
                if idle >= 3:
                    raise ExportError("queue %s: the server reports %d items but hands out"
                                      " none" % (queue, items))
        finally:
            self.lost += consumer.lost
            consumer.close()

    def _more(self, consumer, have):
        """The items that arrived meanwhile on the other lanes, without waiting: one
        put_many carries up to one item per lane."""
        more = []
        while have + len(more) < self.connections:
            got = consumer.fetch(0)
            if not got:
                break
            more += got
        return more

    def _put(self, consumer, queue, batch):
        """Put `batch` into the cluster and confirm each item a server STORED; the rest
        is retried until GIVE_UP, or handed back when every server refuses it."""
        pairs = [(queue, item.data) for item in batch]
        moved = 0
        deadline = time.monotonic() + self.give_up_s
        while True:
            try:
                self.cluster.put_many(pairs)
            except KestrelUnavailable as e:
                left = {id(p) for p in e.remaining}
                stored = [item for item, p in zip(batch, pairs) if id(p) not in left]
                consumer.confirm(stored)
                moved += len(stored)
                self.moved += len(stored)
                batch = [item for item, p in zip(batch, pairs) if id(p) in left]
                pairs = [p for p in pairs if id(p) in left]
                if e.refused:
                    consumer.abort(batch)
                    raise ExportError(
                        "queue %s: %d items refused by every server of the cluster"
                        " (NOT_STORED: a queue full, or an item over its limit); they stay in"
                        " %s: run again once the cluster takes them"
                        % (queue, len(batch), self.child.directory)) from None
                if time.monotonic() > deadline:
                    consumer.abort(batch)
                    raise ExportError("no Kestrel server stored items for %d s (last: %s)"
                                      % (self.give_up_s, e)) from None
                time.sleep(RETRY_S)   # the cluster is down: a client's back-off
                continue
            consumer.confirm(batch)
            self.moved += len(batch)
            return moved + len(batch)


# ---- the command ------------------------------------------------------------------------

def export(directory, servers, connections=32, give_up_s=60.0, out=None, err=None):
    """Move everything; exit code 0 when the directory holds no item afterwards, 1 when
    something stopped it (what was moved stays moved; run it again), 130 on Ctrl-C."""
    out = out or sys.stdout
    err = err or sys.stderr
    child = mover = None
    try:
        directory = check_directory(directory)
        if not os.listdir(directory):
            out.write("%s: no journals, nothing to move\n" % directory)
            return 0
        child = Child(directory).start()
        queues = {q: n for q, (n, _open) in child.queues().items() if n}
        out.write("%s: %d items in %d queues to move into %s (queue server pid %d on %s)\n"
                  % (directory, sum(queues.values()), len(queues), ",".join(servers),
                     child.popen.pid, child.address))
        out.flush()
        mover = Mover(child, servers, connections, give_up_s)
        for queue in sorted(queues):
            out.write("%s: %d moved\n" % (queue, mover.move(queue)))
            out.flush()
        return _report(out, err, directory, child.queues(), mover.moved, len(queues),
                       mover.lost)
    except (ExportError, KestrelError) as e:
        err.write("ingest queue export: %s%s\n" % (e, _so_far(mover)))
        return 1
    except KeyboardInterrupt:
        err.write("ingest queue export: interrupted%s\n" % _so_far(mover))
        return 130
    finally:
        if mover is not None:
            mover.close()
        if child is not None:
            child.stop()
            for line in child.warnings():
                err.write("ingest queue export: the queue server on the directory said: %s\n"
                          % line)


def _so_far(mover):
    if mover is None:
        return ""
    return ("; %d items were moved before it stopped (they stay moved: run it again for"
            " the rest)" % mover.moved)


def _report(out, err, directory, left, total, queue_count, lost):
    remaining = sum(n + o for n, o in left.values())
    out.write("moved %d items from %d queues of %s; %d left\n"
              % (total, queue_count, directory, remaining))
    if lost:
        err.write("ingest queue export: %d confirms did not reach the queue server: those"
                  " items are in the cluster and went back to the queue, so this run or a"
                  " later one may have sent them again (duplicates)\n" % lost)
    if remaining:
        err.write("ingest queue export: %s still holds %d items: run it again\n"
                  % (directory, remaining))
        return 1
    return 0
