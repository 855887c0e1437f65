"""Smoke test of bench/: make a small log, replay it against a real queue + worker and
the bare hello-world baseline, and check that the report adds up.

Every process is started through testkit/procs.py and stopped by pid; the replay
itself is bounded by --duration and a wait deadline.
"""
import json
import subprocess
import sys

from bench import make_log, replay
from testkit.procs import Proc, free_port

DURATION_S = 3
PLOTS = ("throughput.png", "latency.png", "latency_hist.png")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(argv, tmp_path, name, timeout):
    proc = Proc(name, [str(a) for a in argv], tmp_path / "logs").start()
    try:
        code = proc.popen.wait(timeout=timeout)
    finally:
        proc.stop()
    assert code == 0, proc.output()
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
    assert doc["ratio"]["ok_rps"] == round(doc["ok_rps"] / doc["baseline"]["ok_rps"], 3)
    assert "| target |" in (out / "report.md").read_text()  # the default --label
    assert malformed < 20

    # What the worker acknowledged really reached the queue.
    stats = subprocess.run([sys.executable, "-m", "ingest", "stats", "--kestrel",
                            queue_server.address, "--json"],
                           capture_output=True, text=True, timeout=30, check=True)
    queues = json.loads(stats.stdout)["servers"][queue_server.address]["queues"]
    assert queues["events"]["total_items"] >= doc["status_counts"]["200"] * 0.5


def test_log_formats_parse(tmp_path):
    """Both log formats the replayer accepts, including raw non-UTF-8 bytes in a body."""
    line = (b'{"time":"2026-11-26T03:00:00+00:00","remote_addr":"203.0.113.9","method":"POST",'
            b'"uri":"/track?ip=1","status":200,"content_type":"application/x-www-form-urlencoded",'
            b'"body":"data=\\u0001\xff\xfe","request_time":0.001,"bytes_sent":1,"user_agent":""}\n')
    combined = (b'198.51.100.7 - - [26/Nov/2026:03:00:00 +0000] "GET /track?data=e30%3D&ip=1 '
                b'HTTP/1.1" 200 1 "-" "curl/8.0"\n'
                b'198.51.100.7 - - [26/Nov/2026:03:00:00 +0000] "POST /track HTTP/1.1" 200 1 "-" "-"\n')
    path = tmp_path / "mixed.log"
    path.write_bytes(line + combined + b"not a log line\n")
    entries, skipped = replay.load_log(str(path))
    assert entries == [
        ("POST", b"/track?ip=1", b"application/x-www-form-urlencoded", b"data=\x01\xff\xfe",
         "203.0.113.9"),
        ("GET", b"/track?data=e30%3D&ip=1", b"", b"", "198.51.100.7"),
    ]
    assert skipped == 2  # the combined POST (no body in that format) and the junk line
    raw = replay.build_request(entries[0], b"127.0.0.1:8000")
    assert raw == (b"POST /track?ip=1 HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n"
                   b"User-Agent: ingest-bench/1\r\nAccept: */*\r\n"
                   b"X-Forwarded-For: 203.0.113.9\r\n"
                   b"Content-Type: application/x-www-form-urlencoded\r\n"
                   b"Content-Length: 8\r\n\r\ndata=\x01\xff\xfe")
