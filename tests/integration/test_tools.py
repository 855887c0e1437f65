"""`ingest consume` and `ingest stats` as subprocesses against real `ingest queue` servers."""
import json
import signal
import subprocess
import time

from ingest.kestrel import Client
from testkit.payloads import compact_json
from testkit.procs import ROOT, QueueServer, free_port, ingest_argv
from testkit.queues import queue_stats


def ingest(*args, timeout=30):
    return subprocess.run(ingest_argv(*args, quiet=True), cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def records(n, prefix="r"):
    return [compact_json({"event": "%s%d" % (prefix, i), "properties": {"n": i}}).encode()
            for i in range(n)]


def test_consume_max_prints_exactly_n_and_leaves_the_rest(queue_server):
    addr = queue_server.address
    items = records(8)
    Client([addr]).add_many("ev", items)
    done = ingest("consume", "ev", "--kestrel", addr, "--max", "5")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [i.decode() for i in items[:5]]
    s = queue_stats(addr, "ev")
    assert (s["items"], s["open_transactions"]) == (3, 0)
    # the rest is still there, in order
    done = ingest("consume", "ev", "--kestrel", addr, "--timeout-ms", "200")
    assert done.stdout.splitlines() == [i.decode() for i in items[5:]]
    assert queue_stats(addr, "ev")["items"] == 0


def test_consume_exits_after_timeout_without_items(queue_server):
    t0 = time.monotonic()
    done = ingest("consume", "empty", "--kestrel", queue_server.address, "--timeout-ms", "300")
    elapsed = time.monotonic() - t0
    assert (done.returncode, done.stdout) == (0, "")
    assert elapsed >= 0.3


def test_consume_reads_every_server_and_non_json_items(two_servers):
    a, b = two_servers
    Client([a.address]).add_many("mix", [b'{"k":"a"}', b"plain \xff"])
    Client([b.address]).add_many("mix", [b'{\n"k": "b"\n}', b""])
    done = ingest("consume", "mix", "--kestrel", "%s,%s" % (a.address, b.address),
                  "--timeout-ms", "300")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert sorted(lines) == sorted(['{"k":"a"}', '"plain \ufffd"', '{"k":"b"}', '""'])
    assert [json.loads(x) for x in lines]  # every line is JSON
    for s in two_servers:
        st = queue_stats(s.address, "mix")
        assert (st["items"], st["open_transactions"]) == (0, 0)


def test_consume_peek_leaves_the_item(queue_server):
    addr = queue_server.address
    Client([addr]).add_many("pk", [b'{"first":1}', b'{"second":2}'])
    done = ingest("consume", "pk", "--kestrel", addr, "--peek")
    assert (done.returncode, done.stdout) == (0, '{"first":1}\n')
    assert queue_stats(addr, "pk")["items"] == 2


def test_consume_aborts_the_item_when_stdout_fails(queue_server, tmp_path):
    addr = queue_server.address
    Client([addr]).add_many("out", [b'{"kept":1}', b'{"kept":2}'])
    readonly = tmp_path / "readonly"
    readonly.write_bytes(b"")
    with open(readonly, "rb") as stdout:  # writing to it fails with EBADF
        done = subprocess.run(ingest_argv("consume", "out", "--kestrel", addr, quiet=True),
                              cwd=ROOT, stdout=stdout, stderr=subprocess.PIPE, text=True,
                              timeout=30)
    assert done.returncode == 1
    assert "returned to queue" in done.stderr
    s = queue_stats(addr, "out")
    assert (s["items"], s["open_transactions"]) == (2, 0)
    assert Client([addr]).get("out") == b'{"kept":1}'


def test_consume_against_a_dead_server_fails(tmp_path):
    done = ingest("consume", "q", "--kestrel", "127.0.0.1:%d" % free_port(),
                  "--timeout-ms", "200")
    assert done.returncode == 1 and done.stdout == ""
    assert "ingest consume:" in done.stderr


def test_stats_table_and_json(two_servers):
    a, b = two_servers
    Client([a.address]).add_many("st", records(3))
    Client([b.address]).add_many("st", records(2))
    servers = "%s,%s" % (a.address, b.address)
    done = ingest("stats", "--kestrel", servers)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["server", "queue", "items", "total_items", "open", "bytes",
                                "items/s"]
    rows = [line.split() for line in lines[1:]]
    st_rows = [r for r in rows if r[0] == "st"]
    assert sorted(r[1] for r in st_rows) == ["2", "3"]
    done = ingest("stats", "--kestrel", servers, "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["interval_s"] == 1.0
    q = out["servers"][a.address]["queues"]["st"]
    assert (q["items"], q["total_items"], q["open_transactions"], q["rate"]) == (3, 3, 0, 0.0)
    assert q["bytes"] == sum(len(r) for r in records(3))
    assert out["servers"][b.address]["queues"]["st"]["items"] == 2


def test_stats_down_servers(queue_server):
    """A server that does not answer is DOWN, named in the summary line with the reason;
    the exit code tells some (3) from none (1) from all (0)."""
    dead = "127.0.0.1:%d" % free_port()
    Client([queue_server.address]).add_many("st", records(4))
    done = ingest("stats", "--kestrel", "%s,%s" % (queue_server.address, dead), "--json")
    assert done.returncode == 3, done.stderr
    out = json.loads(done.stdout)
    assert out["servers"][dead] is None and out["servers"][queue_server.address]["up"] is True
    assert out["servers"][queue_server.address]["items"] == 4
    assert out["summary"] == {"servers": 2, "answering": 1, "down": [dead], "items": 4}
    assert "refused" in out["errors"][dead], out["errors"]
    done = ingest("stats", "--kestrel", "%s,%s" % (queue_server.address, dead))
    assert done.returncode == 3, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-2] == "2 servers: 1 answer, 1 DOWN (%s); 4 items queued on those that " \
                        "answer" % dead, done.stdout
    assert lines[-1].startswith("DOWN %s: " % dead) and "refused" in lines[-1], done.stdout
    # An IPv6 server is named once, in brackets, as it was given (the client's error
    # names it too, and must not be left doubled on the DOWN line).
    dead6 = "[::1]:%d" % free_port()
    done = ingest("stats", "--kestrel", dead6)
    assert done.returncode == 1, done.stderr
    assert done.stdout.splitlines()[-1].startswith("DOWN %s: " % dead6), done.stdout
    assert done.stdout.count("::1") == 2, done.stdout     # its row and its DOWN line
    done = ingest("stats", "--kestrel", dead)
    assert done.returncode == 1
    assert done.stdout.split()[:14] == ["server", "queue", "items", "total_items", "open",
                                        "bytes", "items/s", dead, "DOWN", "-", "-", "-", "-",
                                        "-"]
    assert "1 server: none answers" in done.stdout
    done = ingest("stats", "--kestrel", queue_server.address)
    assert done.returncode == 0
    assert done.stdout.splitlines()[-1] == "1 server: all answer; 4 items queued"


def test_stats_hung_servers_cost_one_timeout_not_one_each(tmp_path):
    """Two SIGSTOPped servers (connections accepted by the kernel, never answered): the
    command still ends within about one per-server timeout plus the rate interval, and
    names both as DOWN."""
    servers = [QueueServer(tmp_path, name="q%d" % i).start() for i in range(3)]
    try:
        for s in servers[1:]:
            s.proc.signal(signal.SIGSTOP)
        t0 = time.monotonic()
        done = ingest("stats", "--kestrel", ",".join(s.address for s in servers), "--json")
        elapsed = time.monotonic() - t0
    finally:
        for s in servers:
            s.proc.signal(signal.SIGCONT)
            s.proc.stop()
    # 1 s interval + at most 2 x 1 s for the hung ones, once; plus start-up.  Asked one
    # after another, with two samples each, they took 9 s.
    assert elapsed < 5.0, elapsed
    assert done.returncode == 3, done.stdout + done.stderr
    out = json.loads(done.stdout)
    assert out["summary"]["down"] == [s.address for s in servers[1:]], out
    assert all("no reply in time" in out["errors"][s.address] for s in servers[1:]), out
