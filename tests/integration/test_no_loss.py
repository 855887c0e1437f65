"""No acknowledged event is ever lost (issue 5): crashes, outages, a full spool, SIGTERM.

Real processes only: `ingest queue` (journaled, fsync before STORED), `ingest serve
--spool`, and a load driver that records which `$insert_id`s were answered `1`.  Each
test then reads the queue back and checks landed ⊇ acknowledged, printing the
acknowledged, landed and duplicate counts (pytest -s shows them).  Failed requests are
never retried by the driver: only what was acknowledged must land.

Waits poll a condition against a deadline; no test sleeps to wait for something.
"""
import http.client
import json
import os
import signal
import socket
import subprocess
import threading
import time

import pytest

from ingest.kestrel import Client
from testkit.load import Load, track_query
from testkit.procs import QueueServer, Worker, ingest_argv, wait_until

QUEUE = "events"
# Quick recovery: a failed Kestrel server is retried after 200 ms, a stuck one gives up
# after 1 s and the batch spills into the spool.
FAST = ["--kestrel-retry-ms", "200", "--kestrel-timeout-ms", "1000",
        "--kestrel-connect-timeout-ms", "300"]


def segments(spool_dir):
    """Spool segments holding data (an open, empty active segment is not a backlog).

    A segment the forwarder deletes between the listing and its stat is gone, not an
    error: this is polled while the forwarder drains, and a FileNotFoundError would end
    the wait at once instead of polling again."""
    if not os.path.isdir(spool_dir):
        return []
    found = []
    for name in os.listdir(spool_dir):
        if not name.endswith(".seg"):
            continue
        try:
            size = os.path.getsize(os.path.join(spool_dir, name))
        except FileNotFoundError:
            continue                    # forwarded and deleted meanwhile
        if size > 0:
            found.append(name)
    return sorted(found)


def insert_id(item):
    return json.loads(item.decode("utf-8"))["properties"]["$insert_id"]


def collect(address, acked, timeout_s=15.0, settle_ms=300):
    """insert_ids read from the queue until every acknowledged id is there (or the
    deadline), then until the queue stays empty for `settle_ms` (late duplicates)."""
    want = set(acked)
    ids, seen = [], set()
    deadline = time.monotonic() + timeout_s
    with Client([address], timeout_ms=3000) as client:
        while not want <= seen and time.monotonic() < deadline:
            item = client.get(QUEUE, timeout=300)
            if item is not None:
                iid = insert_id(item)
                ids.append(iid)
                seen.add(iid)
        while time.monotonic() < deadline:
            item = client.get(QUEUE, timeout=settle_ms)
            if item is None:
                break
            ids.append(insert_id(item))
    return ids


def check_no_loss(name, result, landed, sent=None):
    """landed ⊇ acknowledged, nothing landed that was never sent; print the counts."""
    acked = set(result.acked)
    landed_set = set(landed)
    duplicates = len(landed) - len(landed_set)
    missing = acked - landed_set
    counts = "%s: acknowledged=%d landed=%d (unique %d) duplicates=%d missing=%d; %s" % (
        name, len(acked), len(landed), len(landed_set), duplicates, len(missing),
        result.summary())
    unanswered = unacked_landed(result, landed_set)
    if unanswered:
        counts += "; landed without an acknowledgement: %d %s" % (
            len(unanswered), sorted(set(map(str, unanswered.values()))))
    print("\n" + counts)
    assert len(acked) == len(result.acked), "an insert_id was acknowledged twice: " + counts
    assert not missing, "acknowledged records lost: %s ... %s" % (sorted(missing)[:10], counts)
    strangers = landed_set - set(sent if sent is not None else result.sent_ids)
    assert not strangers, "records landed that were never sent: %s %s" % (sorted(strangers)[:10],
                                                                            counts)
    assert result.count("truncated") == 0 and not result.malformed, \
        "malformed answers %s %s" % (result.malformed[:5], counts)
    return counts


def unacked_landed(result, landed_set):
    """insert_id -> outcome for records that landed although their request was not
    answered `1` (allowed: at-least-once; but each one is a request that did not finish)."""
    acked = set(result.acked)
    return {i: result.outcome.get(i) for i in landed_set if i not in acked}


def acked_at_least(load, n):
    return lambda: load.result.acked_count >= n


def http_get(url_host, port, path, timeout=3.0):
    conn = http.client.HTTPConnection(url_host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


@pytest.fixture
def procs():
    """Every Proc a test starts; each is stopped by pid afterwards."""
    started = []
    yield started
    for p in started:
        p.stop(timeout=5)


def start_worker(procs, tmp_path, kestrel, spool_dir, extra=(), name="worker"):
    w = Worker(tmp_path, kestrel, extra=["--spool", spool_dir] + FAST + list(extra), name=name)
    procs.append(w.proc)
    return w.start()


def start_queue(procs, tmp_path, **kw):
    q = QueueServer(tmp_path, **kw)
    procs.append(q.proc)
    return q


def test_queue_server_sigkill_and_restart_loses_nothing_acknowledged(tmp_path, procs):
    queue = start_queue(procs, tmp_path).start()
    spool_dir = str(tmp_path / "spool")
    worker = start_worker(procs, tmp_path, queue.address, spool_dir)
    load = Load(worker.host, worker.port, threads=8, max_requests=20000, duration_s=12,
                prefix="q").start()
    try:
        wait_until(acked_at_least(load, 300), timeout=8, message="300 acks before the crash")
        queue.proc.kill()
        # The worker keeps acknowledging from its spool while the queue server is dead.
        during = load.result.acked_count
        wait_until(acked_at_least(load, during + 200), timeout=8,
                   message="acks from the spool while the queue server is down")
        assert segments(spool_dir), "nothing was spooled during the outage"
        queue.start()
        after = load.result.acked_count
        wait_until(acked_at_least(load, after + 200), timeout=8,
                   message="acks after the queue server restarted")
    finally:
        result = load.stop()
    landed = collect(queue.address, result.acked)
    check_no_loss("queue SIGKILL", result, landed)
    wait_until(lambda: not segments(spool_dir), timeout=10, message="spool forwarded and deleted")


def test_worker_sigkill_and_restart_on_same_spool_loses_nothing(tmp_path, procs):
    queue = start_queue(procs, tmp_path).start()
    spool_dir = str(tmp_path / "spool")
    worker = start_worker(procs, tmp_path, queue.address, spool_dir)
    load = Load(worker.host, worker.port, threads=8, max_requests=20000, duration_s=12,
                prefix="w").start()
    try:
        wait_until(acked_at_least(load, 200), timeout=8, message="acks straight to Kestrel")
        # Take Kestrel away so the worker's records pile up in its spool, then crash
        # the worker in the middle of spooling.
        queue.proc.kill()
        spooled_from = load.result.acked_count
        wait_until(acked_at_least(load, spooled_from + 300), timeout=8,
                   message="acks from the spool")
        worker.proc.kill()
        assert segments(spool_dir), "the dead worker left no spool"
        down_errors = load.result.count("conn-error")
        wait_until(lambda: load.result.count("conn-error") > down_errors, timeout=5,
                   message="requests refused while the worker is dead")
        queue.start()
        worker.start()                 # same port, same spool directory
        restarted_at = load.result.acked_count
        wait_until(acked_at_least(load, restarted_at + 200), timeout=8,
                   message="acks from the restarted worker")
    finally:
        result = load.stop()
    landed = collect(queue.address, result.acked)
    check_no_loss("worker SIGKILL", result, landed)
    wait_until(lambda: not segments(spool_dir), timeout=10,
               message="the predecessor's spool forwarded and deleted")


def test_kestrel_down_at_start_spool_acknowledges_then_drains_in_order(tmp_path, procs):
    queue = start_queue(procs, tmp_path)          # port reserved, not started yet
    spool_dir = str(tmp_path / "spool")
    worker = start_worker(procs, tmp_path, queue.address, spool_dir)
    # One sender, so acknowledgement order is the order the spool must preserve; 5 events
    # per request so multi-record batches keep their internal order too.
    result = Load(worker.host, worker.port, threads=1, max_requests=200, duration_s=10,
                  batch=5, prefix="d").run()
    assert result.acked_count == 1000, result.summary()
    assert segments(spool_dir), "acknowledged without a spool segment on disk"
    queue.start()
    landed = collect(queue.address, result.acked)
    check_no_loss("kestrel down at start", result, landed)
    # Order of first arrival (a duplicate, allowed by at-least-once, repeats an earlier id).
    first_seen = list(dict.fromkeys(landed))
    assert first_seen == result.acked, "spool drained out of order (first difference at %d)" % next(
        i for i, (a, b) in enumerate(zip(first_seen + [None], result.acked)) if a != b)
    wait_until(lambda: not segments(spool_dir), timeout=10, message="spool segments deleted")


def test_spool_full_answers_503_retry_after_and_loses_nothing(tmp_path, procs):
    queue = start_queue(procs, tmp_path)          # down until the spool is full
    spool_dir = str(tmp_path / "spool")
    worker = start_worker(procs, tmp_path, queue.address, spool_dir,
                          extra=["--spool-max-mb", "1"])
    # ~1.1 KB per framed event: 1 MiB holds ~950; offer 2000.
    result = Load(worker.host, worker.port, threads=2, max_requests=200, duration_s=15,
                  batch=10, pad=1000, prefix="f").run()
    refused = result.count(503)
    assert refused > 0 and 0 < result.acked_count < 2000, result.summary()
    assert all(v is not None and int(v) >= 1 for v in result.retry_after), \
        "503 without a usable Retry-After: %s" % sorted(set(map(str, result.retry_after)))
    total = sum(os.path.getsize(os.path.join(spool_dir, n)) for n in segments(spool_dir))
    assert total <= 1024 * 1024, "spool grew past its cap: %d bytes" % total
    queue.start()
    landed = collect(queue.address, result.acked)
    check_no_loss("spool full", result, landed)
    wait_until(lambda: not segments(spool_dir), timeout=10, message="full spool drained")
    # Room again: a new request is acknowledged.
    status, headers, body = http_get(worker.host, worker.port, "/track?" + track_query(["after"]))
    assert (status, body) == (200, b"1")


def test_ready_is_503_while_the_spool_refuses_records(tmp_path, procs):
    queue = start_queue(procs, tmp_path)          # never started: Kestrel is down
    spool_dir = str(tmp_path / "spool")
    worker = start_worker(procs, tmp_path, queue.address, spool_dir,
                          extra=["--spool-max-mb", "1"])
    result = Load(worker.host, worker.port, threads=1, max_requests=200, duration_s=15,
                  batch=10, pad=1000, prefix="r").run()
    assert result.count(503) > 0, result.summary()
    status, headers, body = http_get(worker.host, worker.port, "/ready")
    assert status == 503 and b"spool full" in body, (status, body)


def test_sigterm_during_load_finishes_in_flight_and_exits_0(tmp_path, procs):
    queue = start_queue(procs, tmp_path).start()
    spool_dir = str(tmp_path / "spool")
    worker = start_worker(procs, tmp_path, queue.address, spool_dir, extra=["--drain-s", "5"])
    load = Load(worker.host, worker.port, threads=20, max_requests=20000, duration_s=12,
                prefix="t").start()
    try:
        wait_until(acked_at_least(load, 300), timeout=8, message="acks under load")
        signalled = time.monotonic()
        worker.proc.signal(signal.SIGTERM)
        code = worker.proc.popen.wait(timeout=5 + 3)
        took = time.monotonic() - signalled
    finally:
        result = load.stop()
    assert code == 0, "exit code %r after SIGTERM:\n%s" % (code, worker.proc.output())
    assert took < 5 + 1, "drain took %.1fs, budget 5s" % took
    landed = collect(queue.address, result.acked)
    check_no_loss("SIGTERM", result, landed)
    assert not segments(spool_dir)


def test_sigterm_answers_every_request_whose_records_it_stored(tmp_path, procs):
    queue = start_queue(procs, tmp_path).start()
    worker = start_worker(procs, tmp_path, queue.address, str(tmp_path / "spool"),
                          extra=["--drain-s", "5"])
    load = Load(worker.host, worker.port, threads=20, max_requests=20000, duration_s=12,
                prefix="a").start()
    try:
        wait_until(acked_at_least(load, 300), timeout=8, message="acks under load")
        worker.proc.signal(signal.SIGTERM)
        assert worker.proc.popen.wait(timeout=8) == 0
    finally:
        result = load.stop()
    landed = collect(queue.address, result.acked)
    counts = check_no_loss("SIGTERM, answers", result, landed)
    # A request whose records were stored was in flight; it must have been answered.
    cut = unacked_landed(result, set(landed))
    assert not cut, "requests stored but never answered: %s %s" % (sorted(cut.items())[:5], counts)


class Blackhole:
    """A 'Kestrel server' that accepts connections and never answers (a stuck server)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def address(self):
        return "127.0.0.1:%d" % self.port

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self):
        self.sock.close()
        for c in self.accepted:
            c.close()


def test_sigterm_with_requests_stuck_on_a_slow_kestrel_answers_them_all(tmp_path, procs):
    """In-flight requests waiting on a stuck Kestrel are answered (spooled) during the
    drain, the worker exits 0, and `ingest spool forward` delivers them afterwards."""
    hole = Blackhole()
    spool_dir = str(tmp_path / "spool")
    try:
        worker = start_worker(procs, tmp_path, hole.address, spool_dir,
                              extra=["--drain-s", "5", "--kestrel-retry-ms", "5000"])
        load = Load(worker.host, worker.port, threads=20, max_requests=20, duration_s=10,
                    prefix="s").start()
        wait_until(lambda: hole.accepted, timeout=5, message="the worker waiting on Kestrel")
        signalled = time.monotonic()
        worker.proc.signal(signal.SIGTERM)
        code = worker.proc.popen.wait(timeout=8)
        took = time.monotonic() - signalled
        result = load.wait(timeout=10)
    finally:
        hole.close()
    assert code == 0, worker.proc.output()
    assert took < 6, "drain took %.1fs" % took
    assert result.acked_count >= 1 and result.count("truncated") == 0 and not result.malformed, \
        result.summary()
    queue = start_queue(procs, tmp_path).start()
    forward = subprocess.run(ingest_argv("spool", "forward", spool_dir, "--kestrel", queue.address),
                             capture_output=True, timeout=30)
    assert forward.returncode == 0, forward.stderr.decode()
    landed = collect(queue.address, result.acked)
    check_no_loss("SIGTERM, stuck Kestrel", result, landed)
    assert not segments(spool_dir)


def test_spool_forward_cli_empties_a_dead_workers_spool(tmp_path, procs):
    queue = start_queue(procs, tmp_path)          # down while the worker spools
    spool_dir = str(tmp_path / "spool")
    worker = start_worker(procs, tmp_path, queue.address, spool_dir)
    result = Load(worker.host, worker.port, threads=4, max_requests=100, duration_s=10,
                  batch=10, prefix="c").run()
    assert result.acked_count == 1000, result.summary()
    assert worker.proc.stop() == 0, worker.proc.output()
    assert segments(spool_dir)
    queue.start()
    forward = subprocess.run(ingest_argv("spool", "forward", spool_dir, "--kestrel", queue.address),
                             capture_output=True, timeout=30)
    assert forward.returncode == 0, forward.stderr.decode()
    assert b"forwarded 1000 records" in forward.stdout, forward.stdout
    landed = collect(queue.address, result.acked)
    check_no_loss("spool forward CLI", result, landed)
    assert len(landed) == 1000, "duplicates from a clean forward: %d" % (len(landed) - 1000)
    assert segments(spool_dir) == []


def test_requests_beyond_the_in_flight_cap_get_an_immediate_503(tmp_path, procs):
    """Back-pressure: with 4 requests stuck on a Kestrel that never answers, the next
    ones are refused at once with Retry-After instead of queueing behind them."""
    hole = Blackhole()
    try:
        worker = start_worker(procs, tmp_path, hole.address, str(tmp_path / "spool"),
                              extra=["--max-in-flight", "4", "--kestrel-timeout-ms", "2500",
                                     "--kestrel-retry-ms", "5000"])
        load = Load(worker.host, worker.port, threads=8, max_requests=8, duration_s=10,
                    prefix="p").start()
        # The refused four answer long before the stuck ones can (2.5 s Kestrel timeout).
        wait_until(lambda: load.result.count(503) >= 4, timeout=2,
                   message="four immediate 503s")
        assert load.result.acked_count == 0, load.result.summary()
        result = load.wait(timeout=10)
    finally:
        hole.close()
    assert result.count(503) == 4 and result.acked_count == 4, result.summary()
    assert result.retry_after == ["1"] * 4, result.retry_after
