"""What small gzip requests that inflate to megabytes of JSON cost a worker: peak RSS,
RSS after the last answer, and what the clients got.

Stand-alone script, not a test.  One `ingest serve` (defaults unless --worker-args) is
pinned to core 0, `ingest queue --sync-ms 100` to core 1, and this process (core 1)
sends N concurrent POST /track requests, each on its own connection, all released at
once: a gzip body of R records of P properties each (the values repeat, so ~40 KB on
the wire becomes megabytes of JSON).  Printed per shape: the body sizes, the answers
by status (503s with and without Retry-After), the wall time, the worker's peak RSS
(VmHWM from /proc) and its RSS at the last answer and 1..5 s after it.

Bounded: every request has a 120 s timeout, every process it starts is stopped by pid,
the temporary directory is removed.  Loopback only.  Usage:

    .venv/bin/python bench/gzip_rss_bench.py [--requests 80] [--shape 2000x250 ...]
                                             [--worker-args "--max-decompressed-bytes 16777216"]
"""
import argparse
import collections
import gzip
import http.client
import json
import os
import shlex
import shutil
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from testkit.procs import QueueServer, Worker, peak_rss_kib, rss_kib  # noqa: E402

WORKER_CORE, LOAD_CORE = 0, 1


def body(records, properties):
    props = {"p%03d" % j: "v%05d" % j for j in range(properties)}
    events = [{"event": "e", "properties": dict(props, token="t", distinct_id="d%d" % i)}
              for i in range(records)]
    text = json.dumps(events, separators=(",", ":")).encode()
    return len(text), gzip.compress(b"data=" + text)


def burst(host, port, payload, n):
    """n concurrent POSTs released together; [(status, retry-after)] and the wall time."""
    answers, gate = [], threading.Barrier(n + 1)

    def send():
        conn = http.client.HTTPConnection(host, port, timeout=120)
        try:
            gate.wait(30)
            conn.request("POST", "/track", body=payload,
                         headers={"Content-Type": "text/plain", "Content-Encoding": "gzip"})
            resp = conn.getresponse()
            resp.read()
            answers.append((resp.status, resp.getheader("Retry-After")))
        except OSError as exc:
            answers.append(("conn-error " + type(exc).__name__, None))
        finally:
            conn.close()

    threads = [threading.Thread(target=send, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    gate.wait(30)
    started = time.monotonic()
    for t in threads:
        t.join(150)
    return answers, time.monotonic() - started


def run_shape(work, queue, shape, n, worker_args):
    records, properties = (int(x) for x in shape.split("x"))
    json_bytes, payload = body(records, properties)
    worker = Worker(work, queue.address, extra=worker_args, name="worker-%s" % shape,
                    cpu=WORKER_CORE, quiet=True, logdir=work).start()
    try:
        pid = worker.proc.pid
        start_rss = rss_kib(pid)
        answers, took = burst(worker.host, worker.port, payload, n)
        after = [rss_kib(pid)]
        for _ in range(5):
            time.sleep(1.0)          # sampling interval of the RSS curve, not a wait
            after.append(rss_kib(pid))
        peak = peak_rss_kib(pid)
        alive = worker.proc.alive()
    finally:
        worker.proc.stop(15)
    counts = collections.Counter(
        "%s%s" % (s, " +Retry-After" if ra else "") for s, ra in answers)
    print("%s: %d requests of %d bytes gzip (%.1f MB of JSON), worker args %s"
          % (shape, n, len(payload), json_bytes / 1e6, " ".join(worker_args) or "(defaults)"))
    print("   answers %s in %.1f s; worker alive after: %s" % (dict(counts), took, alive))
    print("   RSS: start %d MB, peak %d MB, at last answer %d MB, then %s MB (1 s apart)"
          % (start_rss // 1024, peak // 1024, after[0] // 1024,
             " ".join(str(v // 1024) for v in after[1:])))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=80)
    parser.add_argument("--shape", action="append",
                        help="RECORDSxPROPERTIES (default: 2000x250 and 2000x120)")
    parser.add_argument("--worker-args", default="", help="extra `ingest serve` flags")
    args = parser.parse_args()
    os.sched_setaffinity(0, {LOAD_CORE})
    with open("/proc/loadavg") as fh:
        print("load average before: %s" % " ".join(fh.read().split()[:3]))
    work = tempfile.mkdtemp(prefix="gzip-rss-bench-")
    queue = QueueServer(work, sync_ms=100, cpu=LOAD_CORE, quiet=True, logdir=work).start()
    try:
        for shape in args.shape or ["2000x250", "2000x120"]:
            run_shape(work, queue, shape, args.requests, shlex.split(args.worker_args))
    finally:
        queue.proc.stop(15)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
