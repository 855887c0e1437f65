"""`ingest queue` on dirty disks and under operator mistakes, with real processes.

A byte flipped in the middle of a journal (in memory and in the read-behind part), a
full disk during a journal rewrite and during an append (a small tmpfs; skipped where
mounting is not permitted), a second server on the same port or data directory, the
queue cap, and --config files that used to crash the server.
"""
import json
import os

import pytest

from testkit.damage import flip_byte
from testkit.procs import Proc, QueueServer, ingest_argv, wait_until
from testkit.rawqueue import Wire

from .test_queue_backlog import get_many, make_items, put, qstats


def write_config(tmp_path, config, name="faults"):
    path = os.path.join(str(tmp_path), name + ".json")
    with open(path, "w") as fh:
        if isinstance(config, str):
            fh.write(config)
        else:
            json.dump(config, fh)
    return path


def damaged_copies(data_dir):
    return sorted(n for n in os.listdir(data_dir) if ".damaged-" in n)


# ---- bad bytes ---------------------------------------------------------------------------

def restart_damaged(server, queue, items, flips):
    """Store `items`, stop, flip a byte at each (item index, offset in its record),
    start again; returns the damaged file's bytes."""
    put(Wire(server), queue, items)
    assert server.proc.stop() == 0
    path = os.path.join(server.data, queue)
    record = os.path.getsize(path) // len(items)
    for index, offset in flips:
        flip_byte(path, index * record + offset)
    with open(path, "rb") as fh:
        damaged = fh.read()
    server.start()
    return damaged


def test_flipped_byte_mid_journal_loses_one_item_and_keeps_the_file(tmp_path):
    server = QueueServer(tmp_path, sync_ms=0, name="flip").start()
    try:
        items = make_items(1000)
        # item 499's data, and item 700's length field (repaired: its crc still matches)
        damaged = restart_damaged(server, "flip", items, [(499, 500), (700, 1)])
        w = Wire(server)
        assert get_many(w, "flip", 999) == items[:499] + items[500:]
        assert w.get("flip") is None
        assert qstats(w, "flip")["lost_items"] == 1
        assert "1 items lost, 1 records repaired" in server.proc.output()
        [copy] = damaged_copies(server.data)        # kept whole, not truncated in place
        with open(os.path.join(server.data, copy), "rb") as fh:
            assert fh.read() == damaged
    finally:
        server.proc.stop()


def test_flipped_byte_in_the_read_behind_part_is_found_when_read_back(tmp_path):
    config = write_config(tmp_path, {"default": {"max_memory_bytes": 64 * 1024}})
    server = QueueServer(tmp_path, sync_ms=0, extra=("--config", config),
                         name="behind").start()
    try:
        items = make_items(2000)
        restart_damaged(server, "late", items, [(1499, 500)])   # far past the bound
        w = Wire(server)
        assert get_many(w, "late", 1999) == items[:1499] + items[1500:]
        assert w.get("late") is None
        assert qstats(w, "late")["lost_items"] == 1
        assert "1 item (1024 bytes) lost" in server.proc.output()
        assert len(damaged_copies(server.data)) == 1
    finally:
        server.proc.stop()


# ---- full disk ---------------------------------------------------------------------------

def fill_disk_leaving(mnt, leave):
    """A filler file that leaves about `leave` bytes free on the filesystem
    (testkit.procs.fill_disk fills it whole); `small_disk` is conftest's 8 MiB tmpfs."""
    st = os.statvfs(mnt)
    free = st.f_bavail * st.f_frsize
    with open(os.path.join(mnt, "filler"), "wb") as fh:
        fh.write(b"\0" * max(0, free - leave))
    return os.path.join(mnt, "filler")


def test_full_disk_answers_every_request_and_loses_nothing(tmp_path, small_disk):
    config = write_config(tmp_path, {"default": {"compact_journal_bytes": 1024 * 1024}})
    server = QueueServer(small_disk, sync_ms=0, extra=("--config", config),
                         name="full", logdir=str(tmp_path / "logs")).start()
    try:
        w = Wire(server)
        items = make_items(4000)                                  # a 4 MiB journal
        put(w, "full", items)
        filler = fill_disk_leaving(small_disk, 256 * 1024)
        # Draining makes the journal mostly dead: its rewrite needs ~1 MiB and fails.
        assert get_many(w, "full", 3200) == items[:3200]
        wait_until(lambda: "rewrite abandoned" in server.proc.output(), timeout=10,
                   message="the abandoned rewrite")
        assert "No space left on device" in server.proc.output()
        assert not [n for n in os.listdir(server.data) if "~~" in n]
        assert qstats(w, "full")["items"] == 800
        # Appends until the disk is full: the batch that cannot be written gets no
        # STORED; the server exits 75 and everything it did answer STORED is kept.
        extra = make_items(2000, tag=b"more")
        stored = []
        with pytest.raises((EOFError, ConnectionError)):
            for i in range(0, len(extra), 50):
                w.send(b"".join(b"set full 0 0 1024\r\n%s\r\n" % x for x in extra[i:i + 50]))
                for x in extra[i:i + 50]:
                    assert w.line() == b"STORED"
                    stored.append(x)
        assert wait_until(lambda: server.proc.popen.poll() is not None, timeout=10,
                          message="exit") and server.proc.popen.returncode == 75
        os.unlink(filler)
        server.start()
        w = Wire(server)
        assert get_many(w, "full", 800 + len(stored)) == items[3200:] + stored
        assert w.get("full") is None
        wait_until(lambda: "journal rewritten" in server.proc.output() or
                   os.path.getsize(os.path.join(server.data, "full")) == 0, timeout=10,
                   message="the journal rewritten or truncated once there is room")
    finally:
        server.proc.stop()


# ---- one server per port and per data directory ------------------------------------------

def second_server(tmp_path, port, data, name):
    """Start `ingest queue` on `port` and `data`; (exit status, output) once it exits."""
    proc = Proc(name, ingest_argv("queue", "--host", "127.0.0.1", "--port", port,
                                  "--data", data), str(tmp_path / "logs")).start()
    try:
        wait_until(lambda: proc.popen.poll() is not None, timeout=15,
                   message="the second server to refuse to start")
    finally:
        proc.stop()
    return proc.popen.returncode, proc.output()


def test_second_server_on_the_same_port_or_data_dir_refuses_to_start(tmp_path):
    first = QueueServer(tmp_path, name="first").start()
    try:
        code, out = second_server(tmp_path, first.port, str(tmp_path / "other"), "port")
        assert code != 0 and "Traceback" not in out
        assert "127.0.0.1:%d" % first.port in out and "cannot start" in out
        other = QueueServer(tmp_path, name="dir")
        code, out = second_server(tmp_path, other.port, first.data, "dir")
        assert code != 0 and "Traceback" not in out
        assert first.data in out and "in use by another ingest queue (pid %d)" % \
            first.proc.pid in out
        w = Wire(first)
        assert w.set("still", b"mine") == b"STORED" and w.get("still") == b"mine"
    finally:
        first.proc.stop()


# ---- caps and settings -------------------------------------------------------------------

def test_queue_cap_refuses_a_new_queue_with_server_error(tmp_path):
    server = QueueServer(tmp_path, extra=("--max-queues", "3"), name="cap").start()
    try:
        w = Wire(server)
        for q in ("a", "b", "c"):
            assert w.set(q, b"x") == b"STORED"
        w.send(b"set a 0 0 1\r\ny\r\nset d 0 0 1\r\nz\r\nset a 0 0 1\r\nq\r\n")
        assert w.line() == b"STORED"
        assert w.line() == b"SERVER_ERROR too many queues (max 3)"
        assert w.closed_by_server()            # nothing after it was applied
        w = Wire(server)
        assert get_many(w, "a", 3) == [b"x", b"y", None]
        assert w.cmd(b"get e") == b"SERVER_ERROR too many queues (max 3)"
        assert "queue_d_items" not in Wire(server).stats()
    finally:
        server.proc.stop()


def test_config_that_used_to_crash_the_server(tmp_path):
    bare = write_config(tmp_path, "5", name="bare")
    proc = Proc("bare", ingest_argv("queue", "--port", "1", "--data", str(tmp_path / "d"),
                                    "--config", bare), str(tmp_path / "logs")).start()
    assert proc.popen.wait(timeout=15) == 2
    assert "bad --config" in proc.output() and "Traceback" not in proc.output()
    path = write_config(tmp_path, {"default": {"max_item_bytes": None}}, name="null")
    server = QueueServer(tmp_path, extra=("--config", path, "--max-item-bytes", "1000"),
                         name="null").start()
    try:
        w = Wire(server)
        assert w.set("n", b"x" * 1000) == b"STORED"         # null: --max-item-bytes
        assert w.set("n", b"x" * 1001) == b"NOT_STORED"
        write_config(tmp_path, {"default": {"max_item_bytes": 5000}}, name="null")
        assert w.cmd(b"reload") == b"Reloaded config."
        assert w.set("n", b"x" * 3000) == b"STORED"
        write_config(tmp_path, {}, name="null")
        assert w.cmd(b"reload") == b"Reloaded config."      # default: the flag, not 5000
        assert w.set("n", b"x" * 3000) == b"NOT_STORED"
        assert w.cmd(b"version").startswith(b"VERSION")
    finally:
        server.proc.stop()


def test_max_bytes_and_max_items_while_behind(tmp_path):
    path = write_config(tmp_path, {"default": {"max_memory_bytes": 16 * 1024},
                                   "queues": {"capped": {"max_bytes": 100 * 1024},
                                              "dropping": {"max_items": 100,
                                                           "discard_old_when_full": True}}},
                        name="limits")
    server = QueueServer(tmp_path, extra=("--config", path), name="limits").start()
    try:
        w = Wire(server)
        items = make_items(150)
        put(w, "capped", items[:100])
        assert w.set("capped", items[100]) == b"NOT_STORED"      # full counts the backlog
        put(w, "dropping", items)
        st = qstats(w, "dropping")
        assert (st["items"], st["discarded"]) == (100, 50) and st["mem_items"] < 20
        assert get_many(w, "dropping", 100) == items[50:]
    finally:
        server.proc.stop()

