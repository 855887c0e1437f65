"""The parallel consumer (ingest/kestrel/consumer.py) and `ingest consume --connections`
against real bundled `ingest queue` servers on loopback.

Every item read exactly once over several connections and two servers; confirmation only
after the handler returned; at most one open read per connection; `max_items` exact;
close() with reads held and reads waiting leaves nothing open and nothing lost; a hung
server (SIGSTOPped) does not stall the others and loses nothing; a server SIGKILLed while
its items are held delivers them again after its restart.
"""
import json
import signal
import subprocess
import time

import pytest

from ingest.kestrel import Client
from ingest.kestrel.consumer import Consumer
from ingest.kestrel.errors import KestrelUnavailable
from testkit.procs import ROOT, QueueServer, free_port, ingest_argv, wait_until
from testkit.queues import queue_stats


def items(n, prefix="i"):
    return [b'{"n":"%s%d"}' % (prefix.encode(), i) for i in range(n)]


def fill(address, queue, data):
    assert Client([address]).add_many(queue, data)


def open_reads(servers, queue):
    return sum(queue_stats(s.address, queue).get("open_transactions", 0) for s in servers)


def left(servers, queue):
    return sum(queue_stats(s.address, queue).get("items", 0) for s in servers)


def settles_at(servers, queue, items, open_):
    """Wait until (items left, open reads) on `servers` is (items, open_), failing at the
    deadline.  close() drops the lanes still waiting for a reply, and the server may have
    opened an item for such a lane: it puts it back when it sees the connection close,
    which can be after the consumer (or the `ingest consume` process) is done."""
    wait_until(lambda: (left(servers, queue), open_reads(servers, queue)) == (items, open_),
               timeout=5, message="%s: %d items left and %d open reads" % (queue, items, open_))


def test_every_item_once_over_four_connections_and_two_servers(two_servers):
    a, b = two_servers
    fill(a.address, "par", items(150, "a"))
    fill(b.address, "par", items(150, "b"))
    seen = []
    with Consumer([a.address, b.address], "par", connections=4) as consumer:
        assert len(consumer.lanes) == 4
        assert consumer.run(seen.append, idle_ms=300) == 300
    assert sorted(seen) == sorted(items(150, "a") + items(150, "b"))
    assert (left(two_servers, "par"), open_reads(two_servers, "par")) == (0, 0)


def test_confirmed_only_after_the_handler_returned_and_in_flight_bounded(queue_server):
    addr = queue_server.address
    fill(addr, "held", items(40))
    handled = []
    peak = []

    def handler(data):
        stats = queue_stats(addr, "held")
        # Every item not yet handled is still on the server: queued or open, never gone.
        assert stats["items"] + stats["open_transactions"] == 40 - len(handled)
        peak.append(stats["open_transactions"])
        if len(handled) == 25:
            raise RuntimeError("handler failed")
        handled.append(data)

    with Consumer([addr], "held", connections=3) as consumer:
        with pytest.raises(RuntimeError):
            consumer.run(handler, idle_ms=300)
        # The failing item and the rest of its batch went back at once; the other lanes
        # may still hold the reads they opened meanwhile, but never more than one each.
        assert open_reads([queue_server], "held") <= 3
    assert 1 <= max(peak) <= 3
    settles_at([queue_server], "held", 15, 0)
    rest = []
    with Consumer([addr], "held", connections=1) as consumer:
        consumer.run(rest.append, idle_ms=300)
    assert sorted(handled + rest) == sorted(items(40))


def test_max_items_is_exact_and_close_aborts_held_and_waiting_reads(queue_server):
    addr = queue_server.address
    fill(addr, "cap", items(30))
    got = []
    with Consumer([addr], "cap", connections=4, max_items=7) as consumer:
        assert consumer.run(got.append, idle_ms=300) == 7
    assert (left([queue_server], "cap"), open_reads([queue_server], "cap")) == (23, 0)

    consumer = Consumer([addr], "cap", connections=4)
    held = consumer.fetch(1000)          # held by the caller, not confirmed
    assert held and open_reads([queue_server], "cap") == 4  # the other lanes opened theirs
    consumer.close()
    settles_at([queue_server], "cap", 23, 0)
    with Consumer([addr], "empty", connections=2, wait_ms=5000) as waiting:
        assert waiting.fetch(50) == []    # both lanes still blocked in /t=5000
    assert queue_stats(addr, "empty").get("open_transactions", 0) == 0


def test_a_hung_server_does_not_stall_the_others_and_loses_nothing(two_servers):
    a, b = two_servers
    fill(a.address, "hang", items(20, "a"))
    fill(b.address, "hang", items(20, "b"))
    seen = []
    consumer = Consumer([a.address, b.address], "hang", connections=4, wait_ms=100,
                        timeout_ms=300, retry_ms=200)
    try:
        b.proc.signal(signal.SIGSTOP)
        t0 = time.monotonic()
        consumer.run(seen.append, idle_ms=600)
        assert time.monotonic() - t0 < 10
        assert sorted(seen) == sorted(items(20, "a"))
    finally:
        b.proc.signal(signal.SIGCONT)
    # b never answered: its lanes were dropped, so whatever it opened for them goes back.
    consumer.run(seen.append, idle_ms=600)
    consumer.close()
    assert sorted(seen) == sorted(items(20, "a") + items(20, "b"))
    assert (left(two_servers, "hang"), open_reads(two_servers, "hang")) == (0, 0)


def test_held_items_of_a_killed_server_come_back_after_its_restart(tmp_path):
    queue_server = QueueServer(tmp_path, name="killed").start()
    try:
        _killed_server_case(queue_server)
    finally:
        queue_server.proc.stop()


def _killed_server_case(queue_server):
    addr = queue_server.address
    fill(addr, "crash", items(10))
    consumer = Consumer([addr], "crash", connections=3, timeout_ms=500, retry_ms=100)
    held = consumer.fetch(1000)
    assert held
    queue_server.restart()              # SIGKILL, then start again on its journal
    consumer.confirm(held)              # the connection is gone: nothing is confirmed
    seen = []
    deadline = time.monotonic() + 10
    while len(seen) < 10 and time.monotonic() < deadline:
        try:
            consumer.run(seen.append, idle_ms=300)
        except KestrelUnavailable:
            pass                          # the first connect may race the restart
    consumer.close()
    # At least once: nothing lost.  An item already on its way from the old process
    # could still be handed out, and then comes again: at most one per lane.
    assert set(seen) == set(items(10)) and len(seen) <= 10 + 3


def test_all_servers_down_raises_unavailable(tmp_path):
    consumer = Consumer(["127.0.0.1:%d" % free_port()], "q", connections=2)
    with pytest.raises(KestrelUnavailable):
        consumer.fetch(200)
    consumer.close()


def _consume(*args):
    return subprocess.run(ingest_argv("consume", *args, quiet=True), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_ingest_consume_with_connections(two_servers):
    a, b = two_servers
    servers = "%s,%s" % (a.address, b.address)
    fill(a.address, "cli", items(60, "a"))
    fill(b.address, "cli", items(60, "b"))
    done = _consume("cli", "--kestrel", servers, "--connections", "6", "--max", "100")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == len(set(lines)) == 100
    settles_at(two_servers, "cli", 20, 0)
    done = _consume("cli", "--kestrel", servers, "--connections", "6", "--timeout-ms", "300")
    assert done.returncode == 0, done.stderr
    everything = lines + done.stdout.splitlines()
    assert sorted(json.loads(x)["n"] for x in everything) == sorted(
        json.loads(x)["n"] for x in items(60, "a") + items(60, "b"))
    bad = _consume("cli", "--connections", "0")
    assert bad.returncode == 2 and "--connections" in bad.stderr


def test_a_zero_wait_takes_the_items_already_there(queue_server):
    """fetch(0) and `--timeout-ms 0` wait for no item to arrive, but read those queued:
    a lane's /t=0 read answers at once (they once returned nothing, past their deadline
    before the first reply was read)."""
    addr = queue_server.address
    fill(addr, "now", items(5))
    with Consumer([addr], "now", connections=2) as consumer:
        got = consumer.fetch(0)
        assert 1 <= len(got) <= 2, got
        consumer.confirm(got)
    settles_at([queue_server], "now", 5 - len(got), 0)
    done = _consume("now", "--kestrel", addr, "--timeout-ms", "0")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 5 - len(got), done.stdout


def test_ingest_consume_returns_every_unwritten_item(queue_server, tmp_path):
    addr = queue_server.address
    fill(addr, "ro", items(12))
    readonly = tmp_path / "readonly"
    readonly.write_bytes(b"")
    with open(readonly, "rb") as stdout:  # writing to it fails with EBADF
        done = subprocess.run(ingest_argv("consume", "ro", "--kestrel", addr,
                                          "--connections", "4", quiet=True),
                              cwd=ROOT, stdout=stdout, stderr=subprocess.PIPE, text=True,
                              timeout=30)
    assert done.returncode == 1 and "returned to queue" in done.stderr
    settles_at([queue_server], "ro", 12, 0)


@pytest.fixture(scope="module")
def shared_servers(tmp_path_factory):
    """Two queue servers for the whole module (each test uses its own queue names)."""
    tmp = tmp_path_factory.mktemp("consumer")
    servers = [QueueServer(tmp, name="c%d" % i).start() for i in range(2)]
    yield servers
    for s in servers:
        s.proc.signal(signal.SIGCONT)
        s.proc.stop()


@pytest.fixture
def two_servers(shared_servers):
    return shared_servers


@pytest.fixture
def queue_server(shared_servers):
    return shared_servers[0]
