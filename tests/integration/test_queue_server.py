"""Conformance of `ingest queue` to the Kestrel 2.x memcache protocol, over real sockets.

Every test talks raw bytes to a real `ingest queue` process (no client library, no mock)
and asserts exact replies.  Most tests share one server per module and use their own
queue names; tests that need a config file or stop the server start their own.
"""
import json
import os
import signal
import threading
import time

import pytest

from testkit.procs import QueueServer, rss_kib, wait_until
from testkit.rawqueue import Wire


def qstat(server, queue, name):
    w = Wire(server)
    try:
        return int(w.stats()["queue_%s_%s" % (queue, name)])
    finally:
        w.close()


def waiters(server, queue):
    """Blocked gets on `queue`: 0 while the queue does not exist yet (the waiting get
    that creates it may still be on its way), never a KeyError that ends the polling."""
    w = Wire(server)
    try:
        return int(w.stats().get("queue_%s_waiters" % queue, 0))
    finally:
        w.close()


def assert_server_serves(server):
    """The process is alive and a fresh connection gets a normal reply."""
    assert server.proc.alive(), server.proc.output()
    w = Wire(server)
    try:
        assert w.cmd(b"version").startswith(b"VERSION ")
    finally:
        w.close()


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    server = QueueServer(tmp_path_factory.mktemp("queue"), sync_ms=0).start()
    yield server
    assert server.proc.stop() == 0, server.proc.output()


@pytest.fixture
def conn(srv):
    opened = []

    def make():
        w = Wire(srv)
        opened.append(w)
        return w

    yield make
    for w in opened:
        w.close()


def start_with_config(tmp_path, config, name="cfgqueue", extra=()):
    path = os.path.join(str(tmp_path), name + ".json")
    with open(path, "w") as fh:
        json.dump(config, fh)
    server = QueueServer(tmp_path, sync_ms=100, extra=("--config", path) + tuple(extra),
                         name=name).start()
    return server, path


# ---- basic commands ---------------------------------------------------------------------

def test_set_then_get_in_fifo_order(conn):
    w = conn()
    for i in range(5):
        assert w.set("fifo", b"item-%d" % i) == b"STORED"
    assert [w.get("fifo") for _ in range(6)] == [b"item-%d" % i for i in range(5)] + [None]


def test_commands_are_case_insensitive_queue_names_are_not(conn):
    w = conn()
    w.send(b"SeT CaseQ 0 0 5\r\nupper\r\n")
    assert w.line() == b"STORED"
    assert w.set("caseq", b"lower") == b"STORED"
    assert w.get("caseq") == b"lower"
    w.send(b"GET CaseQ\r\n")
    assert w.value() == b"upper"
    assert w.cmd(b"VERSION").startswith(b"VERSION ")


def test_value_line_carries_bare_queue_name_and_gets_alias(conn):
    w = conn()
    w.set("bare", b"abc")
    w.set("bare", b"def")
    assert w.value_line("bare/t=10/open") == b"VALUE bare 0 3"
    assert w.cmd(b"get bare/close") == b"END"
    w.send(b"gets bare\r\n")
    assert w.value() == b"def"


def test_empty_and_binary_items_round_trip(conn):
    w = conn()
    binary = bytes(range(256)) + b"\r\nEND\r\n\r\n" + b"\x00" * 10
    assert w.set("bin", b"") == b"STORED"
    assert w.set("bin", binary) == b"STORED"
    assert w.get("bin") == b""
    assert w.get("bin") == binary


def test_large_item_round_trip(conn):
    w = conn()
    big = os.urandom(3 * 1024 * 1024)
    assert w.set("bigitem", big) == b"STORED"
    assert w.get("bigitem") == big


def test_pipelined_sets_in_one_write(conn):
    w = conn()
    w.send(b"".join(b"set pipe 0 0 4\r\n%04d\r\n" % i for i in range(2000)))
    assert all(w.line() == b"STORED" for _ in range(2000))
    w.send(b"get pipe\r\n" * 2000)
    assert [w.value() for _ in range(2000)] == [b"%04d" % i for i in range(2000)]


def test_version_flush_flush_all_delete(conn, srv):
    w = conn()
    assert w.cmd(b"version").startswith(b"VERSION 2.4.1-ingest")
    w.set("fl1", b"a")
    w.set("fl1", b"b")
    assert w.cmd(b"flush fl1") == b"END"
    assert w.get("fl1") is None
    w.set("fl2", b"a")
    w.set("fl3", b"a")
    assert w.cmd(b"flush_all") == b"Flushed all queues."
    assert (w.get("fl2"), w.get("fl3")) == (None, None)
    w.set("del1", b"x")
    assert os.path.exists(os.path.join(srv.data, "del1"))
    assert w.cmd(b"delete del1") == b"DELETED"
    assert not os.path.exists(os.path.join(srv.data, "del1"))
    assert "queue_del1_items" not in w.stats()
    assert w.get("del1") is None


def test_quit_closes_connection(conn):
    w = conn()
    w.send(b"quit\r\n")
    assert w.closed_by_server()


def test_unsupported_storage_commands_keep_stream_in_sync(conn):
    w = conn()
    w.send(b"add other 0 0 3\r\nabc\r\n")
    assert w.line().startswith(b"CLIENT_ERROR")
    assert w.set("other", b"ok") == b"STORED"
    assert w.get("other") == b"ok"


def test_non_numeric_flags_is_client_error_without_disconnect(conn):
    w = conn()
    w.send(b"set flagq x 0 2\r\nhi\r\n")
    assert w.line().startswith(b"CLIENT_ERROR")
    assert w.set("flagq", b"ok") == b"STORED"
    assert w.get("flagq") == b"ok"


def test_an_expiry_past_what_a_journal_holds_is_client_error_without_disconnect(conn):
    """A journal record keeps the expiry in ms as an int64: a later one used to kill the
    connection without an answer, after earlier sets of its batch were journaled."""
    w = conn()
    w.send(b"set expq 0 0 2\r\nok\r\nset expq 0 9223372036854776 2\r\nhi\r\n")
    assert w.line() == b"STORED"
    assert w.line().startswith(b"CLIENT_ERROR")
    assert w.set("expq", b"ok2") == b"STORED"
    assert [w.get("expq"), w.get("expq")] == [b"ok", b"ok2"]


# ---- names and illegal requests ---------------------------------------------------------

@pytest.mark.parametrize("line", [
    b"get bad.name", b"get bad~name", b"set bad.name 0 0 1\r\nx",
    b"set bad/name 0 0 1\r\nx", b"set bad~x 0 0 1\r\nx",
])
def test_illegal_queue_names_get_client_error_and_close(conn, srv, line):
    w = conn()
    w.send(line + b"\r\n")
    assert w.line().startswith(b"CLIENT_ERROR")
    assert w.closed_by_server()
    assert_server_serves(srv)


@pytest.mark.parametrize("key", [
    "combo/peek/open", "combo/open/peek", "combo/peek/close", "combo/abort/open",
    "combo/close/abort", "combo/peek/abort", "/open", "combo/t=abc",
])
def test_forbidden_get_options_client_error_and_close(conn, key):
    w = conn()
    w.send(b"get %s\r\n" % key.encode())
    assert w.line().startswith(b"CLIENT_ERROR")
    assert w.closed_by_server()


def test_get_without_key_and_unknown_command(conn, srv):
    w = conn()
    w.send(b"get\r\n")
    assert w.line().startswith(b"CLIENT_ERROR")
    assert w.closed_by_server()
    w2 = conn()
    w2.send(b"frobnicate now\r\n")
    assert w2.line().startswith(b"CLIENT_ERROR")
    assert w2.closed_by_server()
    assert_server_serves(srv)


def test_unknown_get_options_are_ignored(conn):
    w = conn()
    w.set("unk", b"v")
    assert w.get("unk/whatever/t=10") == b"v"


# ---- reliable reads ---------------------------------------------------------------------

def test_close_open_loop_reads_everything_once(conn):
    w = conn()
    for i in range(4):
        w.set("loop", b"%d" % i)
    got = []
    while True:
        item = w.get("loop/close/open")
        if item is None:
            break
        got.append(item)
    assert got == [b"0", b"1", b"2", b"3"]
    assert w.cmd(b"get loop/close") == b"END"
    st = w.stats()
    assert (st["queue_loop_items"], st["queue_loop_open_transactions"]) == ("0", "0")


def test_open_then_close_removes_for_good(conn):
    w, other = conn(), conn()
    w.set("oc", b"a")
    assert w.get("oc/open") == b"a"
    assert int(w.stats()["queue_oc_open_transactions"]) == 1
    assert other.get("oc") is None       # the open item is not visible to others
    assert w.cmd(b"get oc/close") == b"END"
    w.close()
    assert other.get("oc/t=50") is None


def test_abort_returns_item_to_head(conn):
    w, other = conn(), conn()
    w.set("ab", b"first")
    w.set("ab", b"second")
    assert w.get("ab/open") == b"first"
    assert w.cmd(b"get ab/abort") == b"END"
    assert other.get("ab") == b"first"
    assert other.get("ab") == b"second"


def test_close_or_abort_with_nothing_open_is_end(conn):
    w = conn()
    assert w.cmd(b"get nothing/close") == b"END"
    assert w.cmd(b"get nothing/abort") == b"END"
    assert w.cmd(b"get nothing/close/t=100") == b"END"


def test_disconnect_returns_open_items_to_head_in_order(conn, srv):
    w, other = conn(), conn()
    for x in (b"a", b"b", b"c"):
        w.set("disc", x)
    assert w.get("disc/open") == b"a"
    assert w.get("disc/open") == b"b"
    assert other.get("disc") == b"c"
    w.close()
    wait_until(lambda: qstat(srv, "disc", "open_transactions") == 0, timeout=5,
               message="open reads returned")
    assert [other.get("disc") for _ in range(3)] == [b"a", b"b", None]


def test_plain_get_while_read_open_is_error_and_disconnect(conn, srv):
    w, other = conn(), conn()
    w.set("plain", b"x")
    assert w.get("plain/open") == b"x"
    w.send(b"get plain\r\n")
    assert w.line() == b"ERROR"
    assert w.closed_by_server()
    assert other.get("plain/t=2000") == b"x"     # the disconnect returned it


def test_peek_allowed_while_read_open_and_does_not_remove(conn):
    w = conn()
    w.set("pk", b"1")
    w.set("pk", b"2")
    assert w.get("pk/open") == b"1"
    assert w.get("pk/peek") == b"2"
    assert w.get("pk/peek/t=10") == b"2"
    assert w.get("pk/close/open") == b"2"
    assert w.cmd(b"get pk/close") == b"END"
    assert w.get("pk/peek") is None


def test_peek_counts_cmd_peek_and_leaves_item(conn):
    w = conn()
    before = w.stats()
    w.set("pk2", b"v")
    assert w.get("pk2/peek") == b"v"
    assert w.get("pk2/peek") == b"v"
    after = w.stats()
    assert int(after["cmd_peek"]) - int(before["cmd_peek"]) == 2
    assert after["queue_pk2_items"] == "1"


def test_max_open_transactions_limit_is_error_and_disconnect(tmp_path):
    server, _ = start_with_config(tmp_path, {"default": {"max_open_transactions": 2}})
    try:
        w, other = Wire(server), Wire(server)
        for x in (b"a", b"b", b"c"):
            w.set("mot", x)
        assert w.get("mot/open") == b"a"
        assert w.get("mot/open") == b"b"
        w.send(b"get mot/open\r\n")
        assert w.line() == b"ERROR"
        assert w.closed_by_server()
        assert [other.get("mot/t=2000"), other.get("mot"), other.get("mot")] == \
            [b"a", b"b", b"c"]
    finally:
        assert server.proc.stop() == 0


def test_default_max_open_transactions_is_100(conn):
    w = conn()
    w.send(b"".join(b"set many 0 0 1\r\nx\r\n" for _ in range(101)))
    assert all(w.line() == b"STORED" for _ in range(101))
    for _ in range(100):
        assert w.get("many/open") == b"x"
    w.send(b"get many/open\r\n")
    assert w.line() == b"ERROR"
    assert w.closed_by_server()


# ---- blocking reads ---------------------------------------------------------------------

def test_blocking_get_wakes_as_soon_as_an_item_arrives(conn, srv):
    waiting, producer = conn(), conn()
    waiting.send(b"get wake/t=8000\r\n")
    wait_until(lambda: waiters(srv, "wake") == 1, timeout=5, message="waiter")
    start = time.monotonic()
    assert producer.set("wake", b"now") == b"STORED"
    assert waiting.value() == b"now"
    assert time.monotonic() - start < 1.0     # far below the 8 s timeout


def test_blocking_open_and_peek_wake(conn, srv):
    opener, peeker, producer = conn(), conn(), conn()
    peeker.send(b"get bo/peek/t=8000\r\n")
    opener.send(b"get bo/close/open/t=8000\r\n")
    wait_until(lambda: waiters(srv, "bo") == 2, timeout=5, message="waiters")
    start = time.monotonic()
    producer.set("bo", b"it")
    assert peeker.value() == b"it"
    assert opener.value() == b"it"
    assert time.monotonic() - start < 1.0     # far below the 8 s timeout
    assert opener.cmd(b"get bo/close") == b"END"
    assert qstat(srv, "bo", "items") == 0


def test_blocking_get_times_out_with_end(conn):
    w = conn()
    start = time.monotonic()
    assert w.get("empty/t=300") is None
    elapsed = time.monotonic() - start
    assert 0.25 <= elapsed < 2.0


def test_waiter_that_disconnects_is_removed_and_loses_nothing(conn, srv):
    waiting, producer = conn(), conn()
    waiting.send(b"get gone/t=10000\r\n")
    wait_until(lambda: waiters(srv, "gone") == 1, timeout=5, message="waiter")
    waiting.close()
    wait_until(lambda: waiters(srv, "gone") == 0, timeout=5, message="removed")
    producer.set("gone", b"kept")
    assert producer.get("gone") == b"kept"


def test_commands_pipelined_behind_a_blocking_get(conn, srv):
    w, producer = conn(), conn()
    w.send(b"get behind/t=8000\r\nversion\r\n")
    wait_until(lambda: waiters(srv, "behind") == 1, timeout=5, message="waiter")
    producer.set("behind", b"x")
    assert w.value() == b"x"
    assert w.line().startswith(b"VERSION")


# ---- fanout, limits, expiry -------------------------------------------------------------

def test_fanout_copies_sets_to_existing_children(conn):
    w = conn()
    assert w.get("orders+audit") is None          # creates the child
    assert w.set("orders", b"o1") == b"STORED"
    assert w.get("orders+late") is None           # created after o1
    assert w.set("orders", b"o2") == b"STORED"
    assert [w.get("orders"), w.get("orders")] == [b"o1", b"o2"]
    assert [w.get("orders+audit"), w.get("orders+audit")] == [b"o1", b"o2"]
    assert [w.get("orders+late"), w.get("orders+late")] == [b"o2", None]
    w.set("orders+audit", b"direct")
    assert w.get("orders") is None and w.get("orders+audit") == b"direct"


def test_limits_not_stored_and_discard_old(tmp_path):
    config = {"queues": {
        "cap": {"max_items": 2},
        "capb": {"max_bytes": 10},
        "small": {"max_item_bytes": 4},
        "drop": {"max_items": 3, "discard_old_when_full": True},
    }}
    server, _ = start_with_config(tmp_path, config)
    try:
        w = Wire(server)
        assert [w.set("cap", b"%d" % i) for i in range(3)] == \
            [b"STORED", b"STORED", b"NOT_STORED"]
        assert [w.set("capb", b"x" * 6) for i in range(3)] == \
            [b"STORED", b"STORED", b"NOT_STORED"]    # full once bytes >= max (Kestrel)
        assert [w.set("small", b"abcd"), w.set("small", b"abcde")] == [b"STORED", b"NOT_STORED"]
        assert w.set("unlimited", b"x" * 100) == b"STORED"
        for i in range(5):
            assert w.set("drop", b"%d" % i) == b"STORED"
        assert [w.get("drop") for _ in range(4)] == [b"2", b"3", b"4", None]
        st = w.stats()
        assert st["queue_drop_discarded"] == "2"
        assert st["queue_cap_items"] == "2"
    finally:
        assert server.proc.stop() == 0


def test_item_bigger_than_max_item_bytes_is_discarded_not_buffered(tmp_path):
    server = QueueServer(tmp_path, extra=("--max-item-bytes", "1000"), name="maxitem").start()
    try:
        w = Wire(server)
        w.send(b"set mi 0 0 5000\r\n")
        assert w.line() == b"NOT_STORED"
        w.send(b"z" * 5000 + b"\r\n")
        assert w.set("mi", b"y" * 1000) == b"STORED"
        assert w.get("mi") == b"y" * 1000
        assert w.get("mi") is None
    finally:
        assert server.proc.stop() == 0


def test_expiry_absolute_past_relative_and_future(conn, srv):
    w = conn()
    assert w.set("exp", b"old", expiry=1000000) == b"STORED"     # 1970: already expired
    assert w.set("exp", b"live", expiry=int(time.time()) + 3600) == b"STORED"
    assert w.get("exp") == b"live"
    assert qstat(srv, "exp", "expired_items") == 1
    assert w.set("exp2", b"soon", expiry=1) == b"STORED"         # one second from now
    assert w.set("exp2", b"never") == b"STORED"
    assert w.get("exp2/peek") == b"soon"
    wait_until(lambda: w.get("exp2/peek") == b"never", timeout=5, message="expiry")
    assert qstat(srv, "exp2", "expired_items") == 1
    assert w.get("exp2") == b"never"
    w.set("exp3", b"x", expiry=1000000)
    w.set("exp3", b"y", expiry=1000000)
    assert w.cmd(b"flush_expired exp3") == b"2"
    assert w.cmd(b"flush_all_expired") == b"0"


def test_max_age_and_reload(tmp_path):
    server, path = start_with_config(tmp_path, {"queues": {"r": {"max_items": 1}}})
    try:
        w = Wire(server)
        assert [w.set("r", b"1"), w.set("r", b"2")] == [b"STORED", b"NOT_STORED"]
        with open(path, "w") as fh:
            json.dump({"queues": {"r": {"max_items": 5}, "aged": {"max_age_ms": 1}}}, fh)
        assert w.cmd(b"reload") == b"Reloaded config."
        assert w.set("r", b"2") == b"STORED"
        assert w.set("aged", b"gone") == b"STORED"
        wait_until(lambda: w.get("aged/peek") is None, timeout=5, message="max_age")
        with open(path, "w") as fh:
            fh.write("{not json")
        assert w.cmd(b"reload") == b"ERROR"
        assert w.set("r", b"3") == b"STORED"          # old config kept
    finally:
        assert server.proc.stop() == 0


# ---- stats -------------------------------------------------------------------------------

GLOBAL_STATS = ("uptime", "time", "version", "curr_items", "total_items", "bytes",
                "curr_connections", "total_connections", "cmd_get", "cmd_set", "cmd_peek",
                "get_hits", "get_misses")
QUEUE_STATS = ("items", "bytes", "total_items", "logsize", "expired_items", "mem_items",
               "mem_bytes", "age", "discarded", "waiters", "open_transactions",
               "journal_rewrites", "lost_items")


def test_stats_fields_and_values(tmp_path):
    server = QueueServer(tmp_path, name="statsq").start()
    try:
        w = Wire(server)
        w.set("s1", b"12345")
        w.set("s1", b"678")
        w.get("s1")
        w.get("s2")
        st = w.stats()
        assert [k for k in GLOBAL_STATS if k not in st] == []
        assert abs(int(st["time"]) - time.time()) < 5
        assert (st["curr_items"], st["total_items"], st["bytes"]) == ("1", "2", "3")
        assert (st["cmd_set"], st["cmd_get"], st["get_hits"], st["get_misses"]) == \
            ("2", "2", "1", "1")
        w2 = Wire(server)
        st2 = w2.stats()
        assert int(st2["total_connections"]) == int(st["total_connections"]) + 1
        assert (st["curr_connections"], st2["curr_connections"]) == ("1", "2")
        for q in ("s1", "s2"):
            assert [k for k in QUEUE_STATS if "queue_%s_%s" % (q, k) not in st] == []
        assert st["queue_s1_items"] == "1" and st["queue_s1_total_items"] == "2"
        assert st["queue_s1_bytes"] == "3" and st["queue_s1_mem_bytes"] == "3"
        assert int(st["queue_s1_logsize"]) == os.path.getsize(os.path.join(server.data, "s1"))
        w.send(b"dump_stats\r\n")
        lines = []
        while True:
            lines.append(w.line())
            if lines[-1] == b"END":
                break
        assert lines[0] == b"queue 's1' {"
        n = len(QUEUE_STATS)
        assert [line.split(b"=")[0] for line in lines[1:n + 1]] == \
            [b"  " + k.encode() for k in QUEUE_STATS]
        assert lines[1:4] == [b"  items=1", b"  bytes=3", b"  total_items=2"]
        assert lines[n + 1] == b"}"
        assert lines[n + 2:] == [b"queue 's2' {"] + lines[n + 3:2 * n + 3] + [b"}", b"END"]
        w.send(b"dump_stats s2\r\n")
        assert w.line() == b"queue 's2' {"
    finally:
        assert server.proc.stop() == 0


# ---- bad input ---------------------------------------------------------------------------

def test_garbage_bytes_close_connection_server_survives(conn, srv):
    w = conn()
    w.send(b"\x00\xff\xfe garbage \x01\r\n")
    assert w.line().startswith(b"CLIENT_ERROR")
    assert w.closed_by_server()
    assert_server_serves(srv)


def test_overlong_line_without_newline_is_refused(conn, srv):
    w = conn()
    w.send(b"get " + b"a" * 5000)
    assert w.line() == b"CLIENT_ERROR line too long"
    assert w.closed_by_server()
    assert_server_serves(srv)


def test_data_longer_than_declared_is_bad_data_chunk(conn, srv):
    w = conn()
    w.send(b"set lie 0 0 2\r\nabcdef\r\n")
    assert w.line() == b"CLIENT_ERROR bad data chunk"
    assert w.closed_by_server()
    assert "queue_lie_items" not in Wire(srv).stats()


def test_data_shorter_than_declared_waits_then_client_leaves(conn, srv):
    w = conn()
    w.send(b"set short 0 0 100\r\nabc\r\n")
    w.sock.settimeout(0.3)
    assert not w.closed_by_server()       # still waiting for the other 97 bytes
    w.close()
    assert_server_serves(srv)
    assert "queue_short_items" not in Wire(srv).stats()


@pytest.mark.parametrize("length", [b"-1", b"abc", b"99999999999999999999999999"])
def test_bad_or_huge_lengths(conn, srv, length):
    w = conn()
    w.send(b"set huge 0 0 %s\r\n" % length)
    reply = w.line()
    if length.startswith(b"9"):
        # larger than any item: refused at once, the block is discarded as it streams in
        assert reply == b"NOT_STORED"
        w.send(b"x" * 100000)
        w.sock.settimeout(0.3)
        assert not w.closed_by_server()   # still discarding, connection kept
    else:
        assert reply.startswith(b"CLIENT_ERROR")
        assert w.closed_by_server()
    assert_server_serves(srv)


def test_gigabyte_length_does_not_grow_memory(conn, srv):
    before = rss_kib(srv.proc.pid)
    w = conn()
    w.send(b"set gb 0 0 4000000000\r\n")
    assert w.line() == b"NOT_STORED"
    chunk = b"g" * (1 << 20)
    for _ in range(64):
        w.send(chunk)
    w.close()
    assert_server_serves(srv)
    assert rss_kib(srv.proc.pid) - before < 32 * 1024      # KiB: 64 MiB streamed, far less retained


# ---- stopping ----------------------------------------------------------------------------

def test_sigterm_exits_zero(tmp_path):
    server = QueueServer(tmp_path, name="term").start()
    w = Wire(server)
    assert w.set("t", b"x") == b"STORED"
    server.proc.signal(signal.SIGTERM)
    server.proc.popen.wait(timeout=10)
    assert server.proc.popen.returncode == 0, server.proc.output()
    assert "journals synced" in server.proc.output()


def test_shutdown_command_stops_server(tmp_path):
    server = QueueServer(tmp_path, name="shut").start()
    w = Wire(server)
    w.send(b"shutdown\r\n")
    assert w.closed_by_server()
    server.proc.popen.wait(timeout=10)
    assert server.proc.popen.returncode == 0, server.proc.output()


# ---- concurrency -------------------------------------------------------------------------

def test_concurrent_producers_and_blocking_consumers_lose_and_duplicate_nothing(srv):
    produced = [[b"p%d-%04d" % (p, i) for i in range(500)] for p in range(3)]
    received, errors = [[] for _ in range(3)], []
    producing = [3]
    lock = threading.Lock()

    def produce(items):
        w = Wire(srv)
        try:
            for start in range(0, len(items), 50):
                chunk = items[start:start + 50]
                w.send(b"".join(b"set conc 0 0 %d\r\n%s\r\n" % (len(x), x) for x in chunk))
                assert [w.line() for _ in chunk] == [b"STORED"] * len(chunk)
        except Exception as exc:          # reported by the main thread
            errors.append(exc)
        finally:
            w.close()
            with lock:
                producing[0] -= 1

    def consume(out):
        w = Wire(srv)
        try:
            while True:
                # Read before the get: every producer had finished (all its items
                # STORED) before a get that then found nothing, so the queue is drained.
                # Read after it, a producer could store its last items between the
                # empty get and the check, and every consumer leave them behind.
                finished = not producing[0]
                item = w.get("conc/close/open/t=300")
                if item is not None:
                    out.append(item)
                elif finished:
                    return
        except Exception as exc:
            errors.append(exc)
        finally:
            w.close()

    threads = [threading.Thread(target=consume, args=(r,)) for r in received]
    threads += [threading.Thread(target=produce, args=(p,)) for p in produced]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    got = [x for r in received for x in r]
    assert sorted(got) == sorted(x for p in produced for x in p)
    for r in received:                    # each producer's items arrive in its order
        for p in range(3):
            mine = [x for x in r if x.startswith(b"p%d-" % p)]
            assert mine == sorted(mine)
    wait_until(lambda: qstat(srv, "conc", "open_transactions") == 0, timeout=5,
               message="last reads closed by disconnect")
    assert qstat(srv, "conc", "items") == 0
