"""Smoke test of bench/: make a small log, replay it against a real queue + worker and
the bare hello-world baseline, and check that the report adds up; then the replay of a
capture as it was: rejected records counted as rejected (and the run failed), recorded
order at recorded pace, and record times shifted so an old capture lands.

Every process is started through testkit/procs.py and stopped by pid; the replay
itself is bounded by --duration (or the log's length) and a wait deadline.
"""
import base64
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time

import pytest

from bench import capture, cpu, make_log, payload, replay
from testkit.procs import Proc, QueueServer, Worker, free_port, wait_until
from testkit.queues import read_until_empty

DURATION_S = 3
PLOTS = ("throughput.png", "latency.png", "latency_hist.png")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(argv, tmp_path, name, timeout, expect=0):
    proc = Proc(name, [str(a) for a in argv], tmp_path / "logs").start()
    try:
        code = proc.popen.wait(timeout=timeout)
    finally:
        proc.stop()
    assert code == expect, proc.output()
    return proc


def _check_run(summary):
    series = summary["series"]
    assert summary["requests"] > 0
    assert summary["requests"] == sum(s["requests"] for s in series)
    assert summary["errors"] == sum(s["errors"] for s in series) == 0
    assert summary["error_kinds"] == {}
    # No errors, so every request got a status, and the statuses account for all of them.
    assert sum(summary["status_counts"].values()) == summary["requests"]
    assert [s["t"] for s in series] == list(range(1, DURATION_S + 1))
    lat = summary["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert sum(s["ok"] for s in series) == summary["requests"]
    assert summary["loadgen_cpu"]["processes"] == 1
    assert summary["connections_opened"] >= 5


def test_replay_against_worker_and_hello(tmp_path, worker, queue_server):
    log = tmp_path / "access.log"
    malformed = make_log.generate(str(log), 200, seed=7)
    entries, skipped = replay.load_log(str(log))
    assert (len(entries), skipped) == (200, 0)

    hello_port = free_port()
    hello = Proc("hello", [sys.executable, "-m", "bench.hello", "--port", str(hello_port)],
                 tmp_path / "logs").start()
    try:
        hello.wait_port("127.0.0.1", hello_port)
        out = tmp_path / "out"
        _run([sys.executable, "-m", "bench.replay", "--log", log, "--url", worker.url,
              "--baseline-url", "http://127.0.0.1:%d" % hello_port,
              "--processes", 1, "--concurrency", 5, "--duration", DURATION_S, "--out", out,
              "--server-pid", worker.proc.pid, "--baseline-pid", hello.pid],
             tmp_path, "replay", timeout=60)
    finally:
        hello.stop()

    for name in ("report.json", "report.md") + PLOTS:
        assert (out / name).stat().st_size > 0, name
    for name in PLOTS:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    doc = json.loads((out / "report.json").read_text())
    _check_run(doc)
    _check_run(doc["baseline"])
    assert set(doc["baseline"]["status_counts"]) == {"200"}  # hello answers everything
    # The worker answers 200 to well-formed requests and 200/400 to the malformed ones.
    assert set(doc["status_counts"]) <= {"200", "400"}
    assert doc["status_counts"]["200"] >= doc["requests"] * 0.9
    assert doc["meta"]["log_entries"] == 200
    assert doc["meta"]["commit"] and doc["meta"]["date"] and doc["meta"]["mode"]
    # A fresh log: the answers account for every record, and only the malformed few
    # (an event without a token) are rejected.
    records = doc["records"]
    assert records["rejected"] <= records["sent"] * 0.01 and not records["over_threshold"]
    assert set(records["rejected_by_reason"]) <= {"missing_token"}
    assert doc["ratio"]["ok_rps"] == round(doc["ok_rps"] / doc["baseline"]["ok_rps"], 3)
    assert "| target |" in (out / "report.md").read_text()  # the default --label
    assert malformed < 20

    # What the worker acknowledged really reached the queue.
    stats = subprocess.run([sys.executable, "-m", "ingest", "stats", "--kestrel",
                            queue_server.address, "--json"],
                           capture_output=True, text=True, timeout=30, check=True)
    queues = json.loads(stats.stdout)["servers"][queue_server.address]["queues"]
    assert queues["events"]["total_items"] >= doc["status_counts"]["200"] * 0.5


def test_replay_at_once_loads_the_worker_and_the_hello_world_together(tmp_path, worker):
    """run_all --together and compare_commits --shapes mixed: one replay per server,
    started together, each report whole and the ratio taken by CPU per request."""
    from bench import run_all
    log = tmp_path / "access.log"
    make_log.generate(str(log), 200, seed=3)
    hello_port = free_port()
    hello = Proc("hello", [sys.executable, "-m", "bench.hello", "--port", str(hello_port)],
                 tmp_path / "logs").start()
    try:
        hello.wait_port("127.0.0.1", hello_port)
        targets = [("hello-world", "http://127.0.0.1:%d" % hello_port, hello.pid, None,
                    str(tmp_path / "hello")),
                   ("worker", worker.url, worker.proc.pid, None, str(tmp_path / "worker"))]
        (base, target), code = run_all.replay_at_once(
            sys.executable, str(log), targets, DURATION_S, seed=1, concurrency=5,
            loadgen_cpu=None, rate=200)
    finally:
        hello.stop()
    assert code == 0
    for doc, label in ((base, "hello-world"), (target, "worker")):
        _check_run(doc)
        assert doc["label"] == label
        assert doc["server_cpu_us_per_request"] > 0
        assert "baseline" not in doc          # none of them replays a baseline first
        assert doc["rate_target"] == 200      # each paced at --rate (once ignored)
    assert "replayed at the same time as: worker" in base["meta"]["notes"]
    assert (tmp_path / "worker" / "replay.log").stat().st_size > 0
    ratio = run_all._cpu_ratio(base, target)
    assert ratio == base["server_cpu_us_per_request"] / target["server_cpu_us_per_request"]
    assert run_all._together_summary([(base, target, 0)])["median_cpu_ratio"] == round(ratio, 3)


def _started(pid):
    """`pid`'s start time (clock ticks after boot), or None once it has ended (gone, or
    a zombie no one reaped yet): with the pid, it names one process, not a reused pid."""
    try:
        with open("/proc/%d/stat" % pid) as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_stopped_replay_takes_its_load_generators_with_it(tmp_path, signum):
    """bench.run_all SIGTERMs a replay past its timeout, then SIGKILLs it.  Either way
    the load generator processes end with it, instead of sending to the server until
    their --duration (60 s here) ends."""
    log = tmp_path / "access.log"
    make_log.generate(str(log), 100, seed=4)
    hello_port = free_port()
    hello = Proc("hello", [sys.executable, "-m", "bench.hello", "--port", str(hello_port)],
                 tmp_path / "logs").start()
    children = {}
    try:
        hello.wait_port("127.0.0.1", hello_port)
        replaying = Proc("replay", [sys.executable, "-m", "bench.replay", "--log", str(log),
                                    "--url", "http://127.0.0.1:%d" % hello_port,
                                    "--out", str(tmp_path / "out"), "--processes", "2",
                                    "--concurrency", "2", "--duration", "60"],
                         tmp_path / "logs").start()
        try:
            wait_until(lambda: len(cpu.descendants([replaying.pid])) >= 2, timeout=30,
                       message="the replay's two load generator processes")
            children = {pid: _started(pid) for pid in cpu.descendants([replaying.pid])}
            os.kill(replaying.pid, signum)
            code = replaying.popen.wait(timeout=20)
        finally:
            replaying.stop()
        # SIGTERM unwinds the replay (its finally stops the children): status 128 + 15.
        assert code == (-signal.SIGKILL if signum == signal.SIGKILL else 128 + signal.SIGTERM)
        wait_until(lambda: all(_started(pid) != start for pid, start in children.items()),
                   timeout=10, message="the load generators to end with their replay")
    finally:
        for pid, start in children.items():
            if start is not None and _started(pid) == start:
                os.kill(pid, signal.SIGKILL)
        hello.stop()


def test_log_formats_parse(tmp_path):
    """Both log formats the replayer accepts, including raw non-UTF-8 bytes in a body,
    fields a later log format may add, and the entries the replay leaves out."""
    line = (b'{"time":"2026-11-26T03:00:00+00:00","remote_addr":"203.0.113.9","method":"POST",'
            b'"uri":"/track?ip=1","status":200,"content_type":"application/x-www-form-urlencoded",'
            b'"body":"data=\\u0001\xff\xfe","request_time":0.001,"bytes_sent":1,"user_agent":""}\n')
    newer = (b'{"time":"2026-11-26T03:00:01+00:00","msec":"1795662001.250","remote_addr":"10.0.0.2",'
             b'"http_x_forwarded_for":"198.51.100.1","method":"GET","uri":"/api/track?data=e30",'
             b'"status":200,"upstream":"127.0.0.1:8100","user_agent":"x"}\n')
    dropped = b"".join(
        b'{"time":"2026-11-26T03:00:02+00:00","remote_addr":"10.0.0.3","method":"%s",'
        b'"uri":"%s","status":%d%s}\n' % (method, uri, status, body)
        for method, uri, status, body in ((b"GET", b"/ready", 200, b""),
                                          (b"GET", b"/metrics", 200, b""),
                                          (b"POST", b"/import", 401, b',"body":"[]"'),
                                          (b"POST", b"/track", 200, b"")))  # no body logged
    combined = (b'198.51.100.7 - - [26/Nov/2026:03:00:00 +0000] "GET /track?data=e30%3D&ip=1 '
                b'HTTP/1.1" 200 1 "-" "curl/8.0"\n'
                b'198.51.100.7 - - [26/Nov/2026:03:00:00 +0000] "POST /track HTTP/1.1" 200 1 "-" "-"\n')
    path = tmp_path / "mixed.log"
    path.write_bytes(line + newer + dropped + combined + b"not a log line\n")
    entries, skipped = replay.load_log(str(path))
    assert [e[:5] for e in entries[:2]] + [entries[-1][:5]] == [
        ("POST", b"/track?ip=1", b"application/x-www-form-urlencoded", b"data=\x01\xff\xfe",
         "203.0.113.9"),
        ("GET", b"/api/track?data=e30", b"", None, "10.0.0.2"),
        ("GET", b"/track?data=e30%3D&ip=1", b"", b"", "198.51.100.7"),
    ]
    assert skipped == 2  # the combined POST (no body in that format) and the junk line
    assert entries[0].time == entries[-1].time == 1795662000.0 and entries[1].time == 1795662001.25
    kept, why = capture.select(entries)
    assert [e.uri for e in kept] == [b"/track?ip=1", b"/api/track?data=e30",
                                     b"/track?data=e30%3D&ip=1"]
    assert why == {"not an ingestion path": 2, "recorded status 401": 1,
                   "POST logged without its body": 1}
    raw = replay.build_request(entries[0], b"127.0.0.1:8000")
    assert raw == (b"POST /track?ip=1 HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n"
                   b"User-Agent: ingest-bench/1\r\nAccept: */*\r\n"
                   b"X-Forwarded-For: 203.0.113.9\r\n"
                   b"Content-Type: application/x-www-form-urlencoded\r\n"
                   b"Content-Length: 8\r\n\r\ndata=\x01\xff\xfe")
    assert b"X-Forwarded-For: 198.51.100.1, 10.0.0.2\r\n" in replay.build_request(
        entries[1], b"h")


# ---- replaying a capture as it was -------------------------------------------------------

TEN_DAYS_S = 10 * 86400


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """One queue and one worker for the capture tests (each drains what it sent)."""
    tmp = tmp_path_factory.mktemp("capture")
    queue = QueueServer(tmp).start()
    worker = Worker(tmp, queue.address).start()
    yield worker, queue
    worker.proc.stop()
    queue.proc.stop()


def _replay(tmp_path, log, worker, *flags, expect=0):
    out = tmp_path / "out"
    _run([sys.executable, "-m", "bench.replay", "--log", log, "--url", worker.url,
          "--out", out, "--server-pid", worker.proc.pid] + list(flags),
         tmp_path, "replay", timeout=90, expect=expect)
    return json.loads((out / "report.json").read_text()), (out / "report.md").read_text()


def _old_capture(tmp_path, start):
    """A capture of SDK traffic from `start`: Python batches (verbose answers, times in
    seconds) and Node GETs (plain answers, half of the events with times in ms)."""
    log = tmp_path / "old.log"
    make_log.generate(str(log), 30, seed=5, start_time=start, only="python_batch_track",
                      rate=50)
    node = tmp_path / "node.log"
    make_log.generate(str(node), 30, seed=6, start_time=start + 1, only="node_get_track",
                      rate=50)
    log.write_bytes(log.read_bytes() + node.read_bytes())
    records = [r for e in capture.load_log(str(log))[0] for r in payload.Payload(e).records]
    timed = sum(1 for r in records if "time" in r["properties"])
    return log, len(records), timed


def test_rejected_records_are_counted_and_fail_the_run(tmp_path, target):
    worker, queue = target
    log, total, timed = _old_capture(tmp_path, time.time() - TEN_DAYS_S)
    assert 0 < timed < total
    doc, md = _replay(tmp_path, log, worker, "--order", "recorded", "--speed", "0",
                      "--verbose", "--concurrency", 3, expect=3)
    records = doc["records"]
    # Every HTTP answer was a 200, yet every event with a time was refused.
    assert doc["status_counts"] == {"200": 60} and doc["errors"] == 0
    assert (records["rejected"], records["accepted"], records["uncertain"]) == (
        timed, total - timed, 0)
    assert records["rejected_by_reason"] == {"time_too_old": timed}
    assert records["over_threshold"] and md.startswith("# Replay report\n\n```diff\n- FAILED:")
    assert len(read_until_empty(queue.address, "events")) == total - timed


def _sequenced_capture(tmp_path, start, count, rate):
    """`count` single-event GETs, `rate` per recorded second, each numbered."""
    rnd = random.Random(1)
    with open(tmp_path / "seq.log", "w", encoding="utf-8") as fh:
        for i in range(count):
            t = start + i / rate
            event = {"event": "seq", "properties": {"token": "t", "distinct_id": "d",
                                                    "seq": i, "time": round(t, 3)}}
            data = base64.b64encode(json.dumps(event).encode()).decode()
            fh.write(make_log.log_line(t, "GET", "/track?verbose=1&data=" + data, "", "", "",
                                       status=200, rnd=rnd))
    return tmp_path / "seq.log"


def test_recorded_order_at_recorded_pace(tmp_path, target):
    worker, queue = target
    start = int(time.time()) - 5
    log = _sequenced_capture(tmp_path, start, 60, 20)   # three recorded seconds
    t0 = time.monotonic()
    doc, _ = _replay(tmp_path, log, worker, "--order", "recorded", "--speed", "1",
                     "--concurrency", 1)
    assert time.monotonic() - t0 < 30
    assert doc["meta"]["recorded_span_s"] == pytest.approx(2.95, abs=0.01)
    assert 2.7 <= doc["elapsed_s"] <= 4.5, doc["elapsed_s"]
    # Sent over the three seconds, about 20 in each (counted when answered, so a slow
    # answer may land in the next second), not in a burst.
    per_second = [s["requests"] for s in doc["series"]]
    assert sum(per_second) == 60 and all(10 <= n <= 30 for n in per_second[:3]), per_second
    assert doc["requests"] == doc["records"]["accepted"] == 60   # each one sent once
    events = read_until_empty(queue.address, "events")
    assert [e["properties"]["seq"] for e in events] == list(range(60))


def test_shift_time_lands_an_old_capture(tmp_path, target):
    worker, queue = target
    start = time.time() - TEN_DAYS_S
    log, total, timed = _old_capture(tmp_path, start)
    sent = {r["properties"]["$insert_id"]: r["properties"]["time"]
            for e in capture.load_log(str(log))[0] for r in payload.Payload(e).records
            if "$insert_id" in r["properties"]}
    before = time.time()
    doc, _ = _replay(tmp_path, log, worker, "--order", "recorded", "--speed", "0",
                     "--shift-time", "--concurrency", 3)
    records = doc["records"]
    assert records["rejected"] == 0 and "time_too_old" not in records["rejected_by_reason"]
    assert records["accepted"] + records["uncertain"] == total
    assert doc["meta"]["time_shift_s"] == pytest.approx(TEN_DAYS_S, abs=120)
    events = read_until_empty(queue.address, "events")
    assert len(events) == total
    landed = {e["properties"]["$insert_id"]: e["properties"]["time"] for e in events
              if e["properties"].get("$insert_id") in sent}
    assert len(landed) == len(sent) > 10
    # The newest lands at (about) now, and every gap between records is kept.
    assert before - 5 <= max(landed.values()) <= time.time() + 1
    ids = sorted(sent)
    for a, b in zip(ids, ids[1:]):
        assert landed[a] - landed[b] == pytest.approx(sent[a] - sent[b], abs=0.002)


def test_server_cpu_over_every_child_of_a_supervisor(tmp_path):
    """--server-children: the CPU of every process below a parent (as under
    supervisord), helpers left out, and a process restarted meanwhile counted."""
    stop = tmp_path / "stop"
    burn = "import itertools, os; any(os.path.exists(%r) for _ in itertools.count())" % str(stop)
    script = " & ".join([shlex.join([sys.executable, "-c", burn])] * 3) + " & wait"
    parent = Proc("supervisor", ["sh", "-c", script], tmp_path / "logs").start()
    try:
        children = wait_until(lambda: sorted(cpu.descendants([parent.pid])) if len(
            cpu.descendants([parent.pid])) == 3 else None, message="three children")
        group = cpu.ServerProcesses(parents=[parent.pid], exclude=[children[0]])
        before = group.snapshot()
        assert sorted(before) == children[1:]
        t0 = time.monotonic()
        wait_until(lambda: all(cpu.proc_cpu_s(p) - before[p][0] >= 0.1 for p in children[1:]),
                   message="the children to burn CPU")
        usage = cpu.group_usage(before, group.snapshot(), time.monotonic() - t0)
        assert [p["pid"] for p in sorted(usage["processes"], key=lambda p: p["pid"])] == \
            children[1:]
        assert usage["core_share"] == pytest.approx(
            sum(p["core_share"] for p in usage["processes"]), abs=0.01)
        assert usage["core_share"] > 0.3 and usage["exited"] == []
        assert "python" in usage["processes"][0]["name"]
        # A process gone since the first snapshot is reported; a new one counts from 0.
        fake = {children[1]: before[children[1]], 999999: (0.0, "gone")}
        later = cpu.group_usage(fake, group.snapshot(), 1.0)
        assert later["exited"] == [999999]
        assert [p["pid"] for p in later["processes"] if p["new"]] == [children[2]]
    finally:
        stop.write_text("")
        parent.stop()
