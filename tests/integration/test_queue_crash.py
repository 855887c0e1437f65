"""Durability of `ingest queue`: SIGKILL, restart on the same data directory, journals.

A real server is killed with SIGKILL (a process crash) and restarted on the same data
directory; what it said STORED must come back, in order, and reads open at the kill
must be rolled back to the head.  Journal files are damaged on purpose to check torn-tail
recovery, and measured to check that drained and mostly-dead journals shrink.
"""
import json
import os

from testkit.procs import QueueServer, wait_until
from testkit.rawqueue import Wire


def journal(server, queue):
    return os.path.join(server.data, queue)


def drain(w, queue):
    out = []
    while True:
        item = w.get(queue)
        if item is None:
            return out
        out.append(item)


def test_sigkill_after_stored_loses_nothing(tmp_path):
    # sync-ms 100: the acknowledgement only needs the os.write, not the fsync, to
    # survive a process crash.
    server = QueueServer(tmp_path, sync_ms=100).start()
    try:
        w = Wire(server)
        items = [b"item-%05d-" % i + os.urandom(i % 50) for i in range(3000)]
        w.send(b"".join(b"set crash 0 0 %d\r\n%s\r\n" % (len(x), x) for x in items[:2000]))
        assert [w.line() for _ in range(2000)] == [b"STORED"] * 2000
        for x in items[2000:]:
            assert w.set("crash", x) == b"STORED"
        assert w.get("crash") == items[0]        # one consumed before the crash
        server.restart()                        # SIGKILL + start on the same data dir
        assert drain(Wire(server), "crash") == items[1:]
    finally:
        server.proc.stop()


def test_open_read_at_kill_is_rolled_back_to_head(tmp_path):
    server = QueueServer(tmp_path, sync_ms=100).start()
    try:
        w = Wire(server)
        for x in (b"a", b"b", b"c", b"d"):
            w.set("roll", x)
        assert w.get("roll/open") == b"a"
        assert w.get("roll/close/open") == b"b"   # a confirmed, b open
        assert w.get("roll/open") == b"c"         # b and c open
        server.restart()
        w = Wire(server)
        assert "rolled back 2" in server.proc.output()
        assert w.stats()["queue_roll_items"] == "3"
        assert drain(w, "roll") == [b"b", b"c", b"d"]
        server.restart()                         # the rollback itself was journaled
        assert drain(Wire(server), "roll") == []
    finally:
        server.proc.stop()


def test_restart_twice_keeps_abort_order(tmp_path):
    server = QueueServer(tmp_path, sync_ms=0).start()
    try:
        w = Wire(server)
        for x in (b"1", b"2", b"3"):
            w.set("ord", x)
        assert w.get("ord/open") == b"1"
        assert w.get("ord/open") == b"2"
        assert w.cmd(b"get ord/abort") == b"END"   # 1 back at the head, 2 still open
        server.restart()
        server.restart()
        assert drain(Wire(server), "ord") == [b"2", b"1", b"3"]
    finally:
        server.proc.stop()


def test_torn_journal_tail_is_truncated_and_logged(tmp_path):
    server = QueueServer(tmp_path, sync_ms=0).start()
    try:
        w = Wire(server)
        for x in (b"one", b"two", b"three"):
            w.set("torn", x)
        assert server.proc.stop() == 0
        path = journal(server, "torn")
        good = os.path.getsize(path)
        with open(path, "ab") as fh:
            # a header promising 40 bytes followed by only some of them: a cut-short write
            fh.write(b"\x28\x00\x00\x00\x12\x34\x56\x78\x01garbage")
        server.start()
        assert "truncated" in server.proc.output()
        assert os.path.getsize(path) == good
        w = Wire(server)
        assert w.stats()["queue_torn_logsize"] == str(good)     # not counting the cut
        assert w.set("torn", b"four") == b"STORED"
        assert drain(w, "torn") == [b"one", b"two", b"three", b"four"]
    finally:
        server.proc.stop()


def test_half_written_last_record_is_dropped(tmp_path):
    server = QueueServer(tmp_path, sync_ms=0).start()
    try:
        w = Wire(server)
        w.set("half", b"kept")
        w.set("half", b"x" * 100)
        server.proc.kill()
        path = journal(server, "half")
        size = os.path.getsize(path)
        with open(path, "r+b") as fh:
            fh.truncate(size - 50)               # the second ADD record cut in half
        server.start()
        assert "truncated" in server.proc.output()
        assert drain(Wire(server), "half") == [b"kept"]
    finally:
        server.proc.stop()


def test_drained_journal_is_truncated(tmp_path):
    server = QueueServer(tmp_path, sync_ms=100).start()
    try:
        w = Wire(server)
        item = b"d" * 1024
        w.send(b"set drain 0 0 1024\r\n%s\r\n" % item * 1200)
        assert [w.line() for _ in range(1200)] == [b"STORED"] * 1200
        path = journal(server, "drain")
        assert os.path.getsize(path) > 1024 * 1024
        assert len(drain(w, "drain")) == 1200
        assert os.path.getsize(path) == 0
        assert w.stats()["queue_drain_logsize"] == "0"
        assert w.set("drain", b"after") == b"STORED"
        server.restart()
        assert drain(Wire(server), "drain") == [b"after"]
    finally:
        server.proc.stop()


def test_mostly_dead_journal_is_compacted(tmp_path):
    config = os.path.join(str(tmp_path), "compact.json")
    with open(config, "w") as fh:
        json.dump({"default": {"compact_journal_bytes": 200000}}, fh)
    server = QueueServer(tmp_path, sync_ms=100, extra=("--config", config)).start()
    try:
        w = Wire(server)
        items = [b"%04d" % i + b"c" * 996 for i in range(400)]
        w.send(b"".join(b"set cmp 0 0 1000\r\n%s\r\n" % x for x in items))
        assert [w.line() for _ in range(400)] == [b"STORED"] * 400
        assert w.get("cmp/open") == items[0]     # an open read survives the rewrite
        assert w.get("cmp/peek") == items[1]
        other = Wire(server)
        assert [other.get("cmp") for _ in range(1, 390)] == items[1:390]
        # rewritten (in the background) once the file passed 4x its live records, at
        # about 100 live items; 389 removes add only ~3.5 KB after that
        wait_until(lambda: "journal rewritten" in server.proc.output(), timeout=10,
                   message="the rewrite")
        assert os.path.getsize(journal(server, "cmp")) < 110000
        server.restart()                         # rewritten journal replays exactly
        w = Wire(server)
        assert drain(w, "cmp") == [items[0]] + items[390:]
    finally:
        server.proc.stop()


def test_deleted_queue_stays_deleted_after_restart(tmp_path):
    server = QueueServer(tmp_path, sync_ms=0).start()
    try:
        w = Wire(server)
        w.set("gone", b"x")
        w.set("stay", b"y")
        assert w.cmd(b"delete gone") == b"DELETED"
        server.restart()
        w = Wire(server)
        stats = w.stats()
        assert "queue_gone_items" not in stats and stats["queue_stay_items"] == "1"
    finally:
        server.proc.stop()
