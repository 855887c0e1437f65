"""Read-behind in `ingest queue`: a backlog far bigger than a queue's memory bound.

Real servers with a small `max_memory_bytes` (so each test runs in seconds): the RSS is
sampled while a backlog 20x the bound fills and drains, every item must come back once
and in order, and the same must hold across SIGKILL + restart while behind, for fanout
children, reliable reads (open/close/abort) and a journal rewrite that runs while
items are being added and read back.
"""
import json
import os

from testkit.procs import QueueServer, rss_kib, wait_until
from testkit.rawqueue import Wire

ITEM = 1024
BATCH = 500


def start(tmp_path, default, name="behind"):
    path = os.path.join(str(tmp_path), name + ".json")
    with open(path, "w") as fh:
        json.dump({"default": default}, fh)
    return QueueServer(tmp_path, sync_ms=100, extra=("--config", path), name=name).start()


def make_items(n, tag=b""):
    return [tag + b"%08d" % i + b"x" * (ITEM - 8 - len(tag)) for i in range(n)]


def put(w, queue, items, sample=None):
    for i in range(0, len(items), BATCH):
        part = items[i:i + BATCH]
        w.send(b"".join(b"set %s 0 0 %d\r\n%s\r\n" % (queue.encode(), len(x), x)
                        for x in part))
        assert [w.line() for _ in part] == [b"STORED"] * len(part)
        if sample:
            sample()


def get_many(w, key, n, sample=None):
    out = []
    while len(out) < n:
        k = min(BATCH, n - len(out))
        w.send(b"get %s\r\n" % key.encode() * k)
        out += [w.value() for _ in range(k)]
        if sample:
            sample()
    return out


def qstats(w, queue):
    prefix = "queue_%s_" % queue
    return {k[len(prefix):]: int(v) for k, v in w.stats().items() if k.startswith(prefix)}


def test_backlog_of_20x_the_bound_keeps_rss_bounded_and_order_across_kill(tmp_path):
    bound = 2 * 1024 * 1024
    server = start(tmp_path, {"max_memory_bytes": bound})
    try:
        w = Wire(server, timeout=30)
        base = rss_kib(server.proc.pid)
        peak = [base]

        def sample():
            peak[0] = max(peak[0], rss_kib(server.proc.pid))

        items = make_items(20 * bound // ITEM)                 # 40,960 items, 40 MiB
        put(w, "big", items, sample)
        st = qstats(w, "big")
        assert st["items"] == len(items) and st["bytes"] == len(items) * ITEM
        assert st["mem_bytes"] <= bound
        assert get_many(w, "big", len(items) // 2, sample) == items[:len(items) // 2]
        # Memory: the bound plus a fixed overhead (buffers, allocator), not the backlog.
        # Holding every item in memory, as without read-behind, adds over 45 MiB here.
        assert (peak[0] - base) * 1024 < bound + 8 * 1024 * 1024, (base, peak)
        half = len(items) // 2
        assert w.get("big/open") == items[half]              # open at the kill
        server.restart()
        w = Wire(server, timeout=30)
        assert (rss_kib(server.proc.pid) - base) * 1024 < bound + 8 * 1024 * 1024
        assert "rolled back 1 reads" in server.proc.output()
        assert get_many(w, "big", len(items) - half) == items[half:]
        assert w.get("big") is None
        assert qstats(w, "big")["items"] == 0
    finally:
        server.proc.stop()


def test_fanout_and_reliable_reads_while_behind(tmp_path):
    server = start(tmp_path, {"max_memory_bytes": 128 * 1024}, name="fanout")
    try:
        w = Wire(server, timeout=30)
        assert w.get("orders+audit") is None and w.get("orders+billing") is None
        items = make_items(1500)                                 # 12x the bound
        put(w, "orders", items)
        for queue in ("orders", "orders+audit", "orders+billing"):
            st = qstats(w, queue)
            assert st["items"] == 1500 and st["mem_items"] < 150, (queue, st)
        # audit: the consumer loop of reliable reads
        audit = [w.get("orders+audit/open")] + \
            [w.get("orders+audit/close/open") for _ in range(699)]
        assert audit == items[:700]
        # billing: two open, abort the oldest, read on: the aborted one comes first
        assert [w.get("orders+billing/open"), w.get("orders+billing/open")] == items[:2]
        assert w.cmd(b"get orders+billing/abort") == b"END"
        other = Wire(server, timeout=30)
        assert get_many(other, "orders+billing", 3) == [items[0], items[2], items[3]]
        assert get_many(other, "orders", 1000) == items[:1000]
        server.restart()            # SIGKILL: audit's last and billing's open read roll back
        w = Wire(server, timeout=30)
        assert get_many(w, "orders+audit", 801) == items[699:]
        assert get_many(w, "orders+billing", 1497) == [items[1]] + items[4:]
        assert get_many(w, "orders", 500) == items[1000:]
        for queue in ("orders", "orders+audit", "orders+billing"):
            assert w.get(queue) is None
    finally:
        server.proc.stop()


def test_journal_rewrite_while_behind_and_busy_keeps_every_item_in_order(tmp_path):
    """The rewrite streams the backlog from the old file while items keep being added
    and read back; the backlog's read position must land on the same item in the new
    file (whether or not the reader passed the snapshot point meanwhile)."""
    server = start(tmp_path, {"max_memory_bytes": 256 * 1024,
                              "compact_journal_bytes": 1024 * 1024}, name="rewrite")
    try:
        w = Wire(server, timeout=30)
        items = make_items(30000)
        put(w, "rw", items[:16000])
        got, added = [], 16000
        while len(got) < 28000:                   # 100 in, 60 out per round trip
            if added < len(items):
                put(w, "rw", items[added:added + 100])
                added += 100
            got += get_many(w, "rw", 60)
        assert got == items[:len(got)]
        wait_until(lambda: qstats(w, "rw")["journal_rewrites"] >= 1, timeout=20,
                   message="a journal rewrite")
        rest = added - len(got)
        server.restart()                          # the rewritten journal replays the same
        w = Wire(server, timeout=30)
        assert get_many(w, "rw", rest) == items[len(got):added]
        assert w.get("rw") is None
    finally:
        server.proc.stop()
