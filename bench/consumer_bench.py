"""How fast a consumer drains a queue, against what one ingest core writes, same run.

    .venv/bin/python -m bench.consumer_bench [--items 20000] [--connections 1,4,16]
        [--ingest-seconds 8] [--json FILE]

Stand-alone benchmark, not a test.  On a 2-core machine, core 0 runs the code under test
and core 1 the bundled `ingest queue` (--sync-ms 100) and the load generator:

1. Ingest: one `ingest serve` pinned to core 0 takes the synthetic mixed SDK log from
   bench.replay (25 connections, closed loop) for --ingest-seconds; the queue's
   `total_items` growth over the run is what one ingest core writes (records/s).
2. The records it wrote are drained by ingest.kestrel.consumer.Consumer (the largest
   --connections), in this process pinned to core 0: the drain rate of those very records.
3. --items 1 KiB items are drained one reliable read at a time with Client.next() (the
   naive loop), then by the Consumer with each --connections, then by `ingest consume
   --connections N > /dev/null`, each pinned to core 0.

For each: items/s, the consumer's own CPU per item (user + system, from getrusage or
/proc), and the queue server's CPU per item; and the ratio to the ingest rate measured
in step 1.  Every process it starts is stopped by pid; the queue's data directory is
removed at the end.
"""
import argparse
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from ingest.kestrel import Client
from ingest.kestrel.consumer import Consumer
from testkit.procs import ROOT, QueueServer, Worker, cpu_seconds, ingest_argv, pinned

CONSUMER_CPU, QUEUE_CPU = 0, 1
ITEM = b'{"event":"bench","properties":{"pad":"%s"}}'


def _self_cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _fill(address, queue, count, item_bytes):
    pad = "x" * (item_bytes - len(ITEM % b""))
    item = ITEM % pad.encode()
    client = Client([address])
    for start in range(0, count, 500):
        client.put_many([(queue, item)] * min(500, count - start))
    client.close()


def _measure(queue_pid, drain):
    """Run drain() -> items; returns items/s, own CPU us/item, queue CPU us/item."""
    own, served, t0 = _self_cpu(), cpu_seconds(queue_pid), time.perf_counter()
    items = drain()
    elapsed = time.perf_counter() - t0
    return {"items": items, "seconds": round(elapsed, 3),
            "items_per_s": round(items / elapsed),
            "consumer_cpu_us_per_item": round((_self_cpu() - own) / items * 1e6, 1),
            "queue_cpu_us_per_item": round((cpu_seconds(queue_pid) - served) / items * 1e6, 1)}


def naive_drain(address, queue):
    client = Client([address])
    count = 0
    while client.next(queue, timeout=0) is not None:
        count += 1
    client.finish(queue)
    client.close()
    return count


def consumer_drain(address, queue, connections, expected):
    with Consumer([address], queue, connections=connections, max_items=expected) as consumer:
        return consumer.run(lambda data: None, idle_ms=1000)


def cli_drain(address, queue, connections, expected, queue_pid):
    """`ingest consume` as a user runs it, output to /dev/null; its CPU from /proc."""
    argv = pinned(CONSUMER_CPU, ingest_argv("consume", queue, "--kestrel", address,
                                            "--connections", connections, "--max", expected,
                                            quiet=True))
    served, t0 = cpu_seconds(queue_pid), time.perf_counter()
    with open(os.devnull, "wb") as null:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=null)
        _pid, status, usage = os.wait4(proc.pid, 0)   # reaped here, with its rusage
    elapsed = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit("ingest consume failed with status %d" % proc.returncode)
    # Start-up (imports) is included: the figure is an upper bound on CPU per item.
    return {"items": expected, "seconds": round(elapsed, 3),
            "items_per_s": round(expected / elapsed),
            "consumer_cpu_us_per_item": round((usage.ru_utime + usage.ru_stime) / expected * 1e6, 1),
            "queue_cpu_us_per_item": round((cpu_seconds(queue_pid) - served) / expected * 1e6, 1)}


def ingest_rate(tmp, queue, seconds):
    """One worker on core 0 under the mixed SDK log: (records/s written, worker CPU
    us per record, the replay's report)."""
    worker = Worker(tmp, queue.address, cpu=CONSUMER_CPU, quiet=True, logdir=tmp).start()
    try:
        log = os.path.join(tmp, "mixed.log")
        subprocess.run([sys.executable, "-m", "bench.make_log", "--requests", "5000",
                        "--out", log], cwd=ROOT, check=True, capture_output=True)
        before = _total_items(queue.address)
        out = os.path.join(tmp, "replay")
        subprocess.run(pinned(QUEUE_CPU, [sys.executable, "-m", "bench.replay", "--log", log,
                                          "--url", worker.url, "--duration", str(seconds),
                                          "--cpus", str(QUEUE_CPU), "--out", out,
                                          "--server-pid", str(worker.proc.pid)]),
                       cwd=ROOT, check=True, capture_output=True)
        with open(os.path.join(out, "report.json"), encoding="utf-8") as fh:
            report = json.load(fh)
        written = _total_items(queue.address) - before
        cpu_s = report["server_cpu_core_share"] * report["elapsed_s"]
        return written / report["elapsed_s"], cpu_s / written * 1e6, written, report
    finally:
        worker.proc.stop()


def _total_items(address):
    stats = Client([address]).stats()[address]
    return sum(q.get("total_items", 0) for q in stats["queues"].values())


def _queues(address):
    return {name: q["items"] for name, q in Client([address]).stats()[address]["queues"].items()
            if q.get("items")}


def run(args, tmp):
    queue = QueueServer(tmp, sync_ms=100, cpu=QUEUE_CPU, quiet=True, logdir=tmp).start()
    results = {"uptime_before": os.getloadavg()}
    try:
        rate, worker_us, written, report = ingest_rate(tmp, queue, args.ingest_seconds)
        results["ingest"] = {"records_per_s": round(rate), "worker_cpu_us_per_record":
                             round(worker_us, 1), "records": written,
                             "worker_core_share": report["server_cpu_core_share"]}
        print("ingest: one worker on core %d wrote %d records/s (%.1f us of worker CPU per "
              "record; %d records)" % (CONSUMER_CPU, rate, worker_us, written), flush=True)
        os.sched_setaffinity(0, {CONSUMER_CPU})
        widest = max(args.connections)
        results["drain_written"] = {}
        for name, count in _queues(queue.address).items():
            r = _measure(queue.proc.pid, lambda: consumer_drain(queue.address, name, widest, count))
            results["drain_written"][name] = r
            _print("drain %s (written by the worker), %d connections" % (name, widest), r, rate)
        results["one_kib"] = one_kib(args, queue, rate)
    finally:
        queue.proc.stop(timeout=15)
    results["uptime_after"] = os.getloadavg()
    return results


def one_kib(args, queue, rate):
    out = []
    cases = [("naive Client.next()", lambda q, n: naive_drain(queue.address, q))]
    cases += [("Consumer, %d connection(s)" % c,
               lambda q, n, c=c: consumer_drain(queue.address, q, c, n))
              for c in args.connections]
    for i, (name, drain) in enumerate(cases):
        q = "kib%d" % i
        _fill(queue.address, q, args.items, 1024)
        r = _measure(queue.proc.pid, lambda: drain(q, args.items))
        r["case"] = name
        out.append(r)
        _print(name, r, rate)
    for c in (1, max(args.connections)):
        q = "cli%d" % c
        _fill(queue.address, q, args.items, 1024)
        r = cli_drain(queue.address, q, c, args.items, queue.proc.pid)
        r["case"] = "ingest consume --connections %d > /dev/null" % c
        out.append(r)
        _print(r["case"], r, rate)
    return out


def _print(name, r, ingest_rate_):
    print("%-45s %7d items/s  consumer CPU %6.1f us/item  queue CPU %6.1f us/item  "
          "x%.2f of the ingest core's rate" % (name, r["items_per_s"],
                                                r["consumer_cpu_us_per_item"],
                                                r["queue_cpu_us_per_item"],
                                                r["items_per_s"] / ingest_rate_), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.consumer_bench",
                                description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=20000, help="1 KiB items per case")
    p.add_argument("--connections", default="1,4,16",
                   help="comma-separated connection counts for the Consumer")
    p.add_argument("--ingest-seconds", type=float, default=8.0)
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)
    args.connections = [int(c) for c in args.connections.split(",")]
    if os.cpu_count() < 2:
        raise SystemExit("consumer_bench needs 2 cores (code under test / queue)")
    tmp = tempfile.mkdtemp(prefix="consumer-bench-")
    try:
        results = run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
