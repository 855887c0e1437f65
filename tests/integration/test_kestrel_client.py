"""The Kestrel client against real bundled `ingest queue` servers on loopback.

Every method, exact contents and order of pipelined writes, failover when one of two
servers is SIGKILLed (and its return after retry_ms), reliable reads closed on the server
that holds them, timeouts that leave no half-read socket behind, and many green threads
sharing one client (in a monkey-patched subprocess).
"""
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from ingest.kestrel import Client, KestrelError
from ingest.kestrel.errors import InvalidQueueName, KestrelUnavailable
from testkit.procs import ROOT, QueueServer, wait_until
from testkit.queues import queue_stats


class Clock:
    """Drives the client's back-off so a test never has to wait retry_ms out."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@contextlib.contextmanager
def added_later(address, queue, item, delay_s):
    """Add `item` to `queue` on `address` from another thread `delay_s` after entering,
    while the body blocks in a get; the thread is joined on the way out."""
    timer = threading.Timer(delay_s, lambda: Client([address]).add(queue, item))
    timer.start()
    try:
        yield
    finally:
        timer.join()


def drain(address, queue):
    """Every item left on one server's queue, in order (blocking get per item)."""
    out = []
    with Client([address]) as c:
        while True:
            item = c.get(queue, timeout=100 if not out else 0)
            if item is None:
                return out
            out.append(item)


# ---- every method on one server -----------------------------------------------------------

def test_every_method(queue_server):
    addr = queue_server.address
    with Client([addr]) as c:
        assert c.version().startswith("2.4.1")
        assert c.add("m", b"one") is True
        assert c.add("m", "twö") is True
        assert c.add_many("m", [b"three", "four"]) is True
        assert c.put_many([("m", b"five"), ("other", b"x")]) is None
        assert c.peek("m") == b"one"
        assert c.get("m") == b"one"
        # reliable read: open, abort (back to the head), open again, finish
        assert c.next("m") == "twö".encode("utf-8")
        assert queue_stats(addr, "m")["open_transactions"] == 1
        assert c.abort("m") is True
        assert c.abort("m") is False
        assert c.next("m") == "twö".encode("utf-8")
        assert c.next("m") == b"three"  # closes twö, opens three
        assert c.finish("m") is True
        assert c.finish("m") is False
        s = queue_stats(addr, "m")
        assert (s["items"], s["open_transactions"], s["total_items"]) == (2, 0, 5)
        stats = c.stats()[addr]
        assert stats["server"]["total_items"] == 6 and stats["queues"]["other"]["items"] == 1
        assert c.flush("m") is True
        assert c.get("m") is None and c.peek("m") is None and c.next("m") is None
        assert c.flush_all() is True
        assert c.get("other") is None
        assert c.delete("other") is True
        assert "other" not in c.stats()[addr]["queues"]
        with pytest.raises(InvalidQueueName):
            c.add("bad name", b"x")
        with pytest.raises(InvalidQueueName):
            c.get("a/b")


def test_blocking_get_waits_for_an_item_and_times_out(queue_server):
    import time
    with Client([queue_server.address]) as c:
        t0 = time.monotonic()
        assert c.get("wait", timeout=300) is None
        assert 0.25 <= time.monotonic() - t0 < 1.5
        # an item added while a get blocks is returned to it
        with added_later(queue_server.address, "wait", b"w", 0.1):
            assert c.get("wait", timeout=3000) == b"w"


def test_put_many_exact_contents_and_order(queue_server):
    addr = queue_server.address
    batch = [("bin", b"a\r\nb"), ("bin", b""), ("txt", b"t1"), ("bin", b"\r\n"),
             ("bin", b"END\r\nVALUE x 0 3\r\n"), ("bin", bytes(range(256)) * 40),
             ("txt", b""), ("big", os.urandom(3 * 1024 * 1024 + 7)), ("bin", b"last")]
    with Client([addr]) as c:
        assert c.put_many(batch) is None
        assert c.put_many([("bin", b"x%d" % i) for i in range(500)]) is None
    assert drain(addr, "bin") == [d for q, d in batch if q == "bin"] + \
        [b"x%d" % i for i in range(500)]
    assert drain(addr, "txt") == [b"t1", b""]
    assert drain(addr, "big") == [d for q, d in batch if q == "big"]


def test_item_refused_by_server_raises_with_remaining(tmp_path):
    server = QueueServer(tmp_path, extra=("--max-item-bytes", "100")).start()
    try:
        with Client([server.address]) as c:
            batch = [("lim", b"small"), ("lim", b"x" * 101), ("lim", b"ok")]
            with pytest.raises(KestrelUnavailable) as e:
                c.put_many(batch)
            assert e.value.remaining == [("lim", b"x" * 101)]
            assert c.add("lim", b"y" * 200) is False
            # NOT_STORED is not a server failure: the server keeps being used
            assert c.add("lim", b"fine") is True
        assert drain(server.address, "lim") == [b"small", b"ok", b"fine"]
    finally:
        server.proc.stop()


# ---- two servers: failover, back-off, reads everywhere ------------------------------------

def test_failover_when_one_server_is_killed_and_its_return(two_servers):
    a, b = two_servers
    clock = Clock()
    c = Client([a.address, b.address], retry_ms=1000, clock=clock)
    sent = []

    def write(batches):
        for _ in range(batches):
            batch = [("fo", b"%d" % (len(sent) + i)) for i in range(10)]
            assert c.put_many(batch) is None
            sent.extend(d for _, d in batch)

    write(10)  # rotation spreads the batches over both servers
    assert queue_stats(a.address, "fo")["total_items"] == 50
    assert queue_stats(b.address, "fo")["total_items"] == 50
    b.proc.kill()
    write(20)  # every batch still succeeds
    assert queue_stats(a.address, "fo")["total_items"] == 250
    b.start()  # replays its journal: its 50 items are back (counters restart at 0)
    write(4)  # still backing off: nothing goes to b yet
    assert queue_stats(b.address, "fo")["items"] == 50
    clock.now += 1.001
    write(4)
    assert queue_stats(b.address, "fo")["items"] == 50 + 20
    assert queue_stats(a.address, "fo")["total_items"] == 250 + 40 + 20
    c.close()
    got = drain(a.address, "fo") + drain(b.address, "fo")
    assert sorted(got) == sorted(sent) and len(sent) == 380


def test_writes_keep_succeeding_while_a_server_is_killed_mid_stream(two_servers):
    """A writer thread streams batches; one server is SIGKILLed under it.  No call fails,
    nothing is lost; at most the one batch in flight may be duplicated."""
    a, b = two_servers
    c = Client([a.address, b.address], retry_ms=60000)
    sent, errors, stop = [], [], threading.Event()

    def writer():
        n = 0
        while not stop.is_set():
            batch = [("live", b"%d" % (n + i)) for i in range(10)]
            try:
                c.put_many(batch)
            except Exception as e:  # the assertion below reports it
                errors.append(repr(e))
                return
            sent.extend(d for _, d in batch)
            n += 10

    t = threading.Thread(target=writer)
    t.start()
    try:
        wait_until(lambda: len(sent) >= 200, 10, message="200 items written")
        b.proc.kill()
        killed_at = len(sent)
        wait_until(lambda: len(sent) >= killed_at + 500 or errors, 10,
                   message="500 more items written")
    finally:
        stop.set()
        t.join(10)
    assert errors == []
    b.start()
    got = drain(a.address, "live") + drain(b.address, "live")
    assert set(got) == set(sent)
    assert len(sent) <= len(got) <= len(sent) + 10


def test_blocking_read_over_two_servers_waits_instead_of_polling(two_servers):
    import time
    a, b = two_servers
    with Client([a.address, b.address]) as c:
        before = c.stats()
        t0 = time.monotonic()
        assert c.get("idle", timeout=1000) is None
        elapsed = time.monotonic() - t0
        after = c.stats()
    gets = sum(after[k]["server"]["cmd_get"] - before[k]["server"]["cmd_get"] for k in after)
    # one quick round over both servers, then one blocking /t= of ~500 ms on each
    assert 4 <= gets <= 6
    assert 0.95 <= elapsed < 2.0


def test_all_servers_down_raises_unavailable_with_everything_remaining(two_servers):
    a, b = two_servers
    c = Client([a.address, b.address], retry_ms=60000)
    a.proc.kill()
    b.proc.kill()
    batch = [("gone", b"1"), ("gone", b"2")]
    with pytest.raises(KestrelUnavailable) as e:
        c.put_many(batch)
    assert e.value.remaining == batch
    assert c.add("gone", b"3") is False
    with pytest.raises(KestrelUnavailable):
        c.get("gone")
    assert c.stats() == {a.address: None, b.address: None}
    assert c.delete("gone") is False
    with pytest.raises(KestrelError):
        c.version()


def test_reads_visit_every_server(two_servers):
    a, b = two_servers
    Client([b.address]).add("spread", b"only-on-b")
    with Client([a.address, b.address]) as c:
        for _ in range(3):  # whichever server the rotation asks first
            assert c.peek("spread") == b"only-on-b"
        assert c.get("spread") == b"only-on-b"
        assert c.get("spread") is None
        # a blocking read over two servers sees an item that arrives on either
        with added_later(a.address, "spread", b"late", 0.2):
            assert c.get("spread", timeout=3000) == b"late"


def test_next_closes_the_read_on_the_server_that_holds_it(two_servers):
    a, b = two_servers
    Client([a.address]).add("rr", b"from-a")
    Client([b.address]).add("rr", b"from-b")
    by_item = {b"from-a": a.address, b"from-b": b.address}
    with Client([a.address, b.address]) as c:
        first = c.next("rr")
        holder = by_item[first]
        other = (set(by_item.values()) - {holder}).pop()
        assert queue_stats(holder, "rr")["open_transactions"] == 1
        # a plain get on the same queue by the same thread uses another connection
        assert c.peek("rr") is not None
        second = c.next("rr")
        assert {first, second} == set(by_item)
        assert queue_stats(holder, "rr")["open_transactions"] == 0
        assert queue_stats(other, "rr")["open_transactions"] == 1
        assert c.next("rr") is None  # closes the second read, nothing left
        for addr in (a.address, b.address):
            s = queue_stats(addr, "rr")
            assert (s["items"], s["open_transactions"], s["total_items"]) == (0, 0, 1)
        # abort returns the item to the head of the server that held it
        Client([b.address]).add("rr", b"again")
        assert c.next("rr") == b"again"
        assert c.abort("rr") is True
        s = queue_stats(b.address, "rr")
        assert (s["items"], s["open_transactions"]) == (1, 0)


def test_open_read_is_rolled_back_when_the_client_closes(queue_server):
    addr = queue_server.address
    Client([addr]).add("rb", b"item")
    c = Client([addr])
    assert c.next("rb") == b"item"
    c.close()
    assert Client([addr]).get("rb", timeout=2000) == b"item"


def test_timeout_closes_the_socket_and_next_call_is_clean(queue_server):
    """A stopped server makes the read time out; the half-read socket must not be
    reused once the server answers again."""
    addr = queue_server.address
    c = Client([addr], timeout_ms=300, retry_ms=0)
    assert c.add("hung", b"before") is True
    queue_server.proc.signal(signal.SIGSTOP)
    try:
        with pytest.raises(KestrelUnavailable) as e:
            c.put_many([("hung", b"late")])
        assert e.value.remaining == [("hung", b"late")]
    finally:
        queue_server.proc.signal(signal.SIGCONT)
    # the server now processes the `set` it had buffered (at-least-once: it is stored)
    assert c.put_many([("hung", b"after")]) is None
    assert c.get("hung") == b"before"
    assert c.get("hung", timeout=1000) == b"late"
    assert c.get("hung") == b"after"
    assert c.get("hung") is None


def test_reused_connection_to_a_restarted_server_is_replaced(queue_server):
    addr = queue_server.address
    c = Client([addr], retry_ms=60000)
    assert c.add("re", b"1") is True  # leaves an idle pooled connection
    queue_server.restart()  # same port and data directory
    # the stale pooled socket fails without a reply; a fresh one is used, no back-off
    assert c.add("re", b"2") is True
    assert c.get("re") == b"1" and c.get("re") == b"2"


# ---- many green threads sharing one client -------------------------------------------------

@pytest.fixture
def two_fast_servers(tmp_path):
    # fsync every 100 ms rather than per batch: this test is about the client
    servers = [QueueServer(tmp_path, sync_ms=100, name="g%d" % i).start() for i in range(2)]
    yield servers
    for s in servers:
        s.proc.stop()


def test_many_green_threads_share_one_client(two_fast_servers):
    two_servers = two_fast_servers
    script = os.path.join(os.path.dirname(__file__), "green_clients.py")
    servers = ",".join(s.address for s in two_servers)
    done = subprocess.run([sys.executable, script, servers, "200", "50", "3"], cwd=ROOT,
                          capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"written": 30000, "read": 30000, "distinct": 30000, "missing": 0,
                      "duplicates": 0, "errors": [], "pooled_max": result["pooled_max"],
                      "open_reads_left": 0}
    assert 1 <= result["pooled_max"] <= 64 * 2
    for s in two_servers:
        stats = queue_stats(s.address, "green")
        assert (stats["items"], stats["open_transactions"]) == (0, 0)


def test_a_server_trickling_replies_is_bounded_by_the_timeout():
    """The read timeout bounds a whole reply, not each recv: a peer that sends STORED
    one byte every 50 ms (each recv well inside the timeout) is abandoned after ~0.5 s."""
    import socket as _socket
    import threading as _threading
    import time as _time
    listener = _socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    stop = _threading.Event()

    def trickle():
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            try:
                conn.recv(65536)
                for byte in b"STORED\r\n" * 5:
                    if stop.is_set():
                        return
                    conn.sendall(bytes([byte]))
                    _time.sleep(0.05)        # the misbehaviour under test, not a wait
            except OSError:
                return

    thread = _threading.Thread(target=trickle, daemon=True)
    thread.start()
    client = Client(["127.0.0.1:%d" % listener.getsockname()[1]], timeout_ms=500)
    started = _time.monotonic()
    try:
        with pytest.raises(KestrelUnavailable) as info:
            client.put_many([("q", b"%d" % i) for i in range(5)])
        took = _time.monotonic() - started
    finally:
        stop.set()
        client.close()
        listener.close()
        thread.join(5)
    assert took < 1.5, took
    assert len(info.value.remaining) >= 1
