"""The cost of the spool path and the time to forward a big spool (issue 5's numbers).

Stand-alone script, not a test.

(a) Spool path cost: one `ingest serve` pinned to core 0 (taskset -c 0) receives /track
    load from this process pinned to core 1 (threads over keep-alive http.client, see
    testkit/load.py): single-event GETs and 50-event form POSTs, each for a fixed
    time.  Four worker set-ups in the same run: Kestrel up (a bundled `ingest queue
    --sync-ms 100`; with two cores it must share one, so it is measured both beside the
    load on core 1 and beside the worker on core 0), Kestrel down with --spool-sync-ms 0
    (fsync before answering) and Kestrel down with --spool-sync-ms 100.  Prints
    acknowledged events/s and the ratio to the first Kestrel-up figure, and the worker's
    CPU time per acknowledged event (from /proc; steadier than events/s on a busy
    machine): medians of --rounds interleaved runs (the load average is printed).
(b) Forwarding: builds a spool of 1,000,000 records (~250 bytes of JSON each, like a
    cleaned event) in-process with ingest.sinks.spool.Spool.append, then times `ingest spool
    forward DIR --kestrel ...` (core 0) into a fresh `ingest queue --sync-ms 100` (core 1)
    and checks the queue holds every record.
(c) Framing cost per record, in-process on core 1: encoding a frame and reading it back
    (frames.scan) in the current format against the earlier format (testkit.spoolfiles
    writes it; frames reads it), in the same run, CPU time, median of --rounds.

Bounded: fixed durations and counts, a cap on every wait (the whole run takes about two
minutes); every process it starts is stopped by pid; temporary directories (on disk under
/var/tmp, not tmpfs, so fsync costs what it costs) are removed.  Loopback only.  Usage:

    .venv/bin/python bench/spool_bench.py [--seconds 3] [--rounds 3] [--threads 8]
                                          [--records 1000000] [--skip-a] [--skip-b] [--skip-c]
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ingest.kestrel import Client  # noqa: E402
from ingest.sinks import frames  # noqa: E402
from ingest.sinks.spool import Spool  # noqa: E402
from testkit.load import Load  # noqa: E402
from testkit.spoolfiles import legacy_frame  # noqa: E402
from testkit.payloads import compact_json  # noqa: E402
from testkit.procs import (QueueServer, Worker, cpu_seconds, free_port,  # noqa: E402
                           ingest_argv, pinned)

WORKER_CORE, LOAD_CORE = 0, 1
FORWARD_CAP_S = 120.0
STOP_TIMEOUT_S = 15.0


def start_queue(work, name, sync_ms=100, core=LOAD_CORE):
    """`ingest queue` pinned to `core`, data and log under `work`, polled until it listens."""
    return QueueServer(work, sync_ms=sync_ms, name=name, cpu=core, quiet=True,
                       logdir=work).start()


def start_worker(work, name, kestrel, extra=()):
    """`ingest serve` pinned to WORKER_CORE, log under `work`, polled until it listens."""
    return Worker(work, kestrel, extra=extra, name=name, cpu=WORKER_CORE, quiet=True,
                  logdir=work).start()


def measure(port, seconds, threads, batch, prefix):
    result = Load("127.0.0.1", port, threads=threads, max_requests=10 ** 7,
                  duration_s=seconds, batch=batch, prefix=prefix).run()
    if result.malformed or result.count("truncated") or result.count(503):
        print("   note: %s" % result.summary())
    return result.events_per_s(), result


def spool_path_cost(work, seconds, threads, rounds):
    print("(a) spool path cost: worker on core %d, load (%d threads) on core %d; %d rounds of"
          " %.0f s per cell, median shown; load average before: %s"
          % (WORKER_CORE, threads, LOAD_CORE, rounds, seconds, load_average()))
    # Two cores only: the queue server shares a core with either the load or the worker;
    # both are measured, since either placement flatters one side.
    queue = start_queue(work, "queue-a")
    queue0 = start_queue(work, "queue-a0", core=WORKER_CORE)
    dead = "127.0.0.1:%d" % free_port()          # nothing listens here
    setups = [("kestrel up (queue on core %d)" % LOAD_CORE, queue.address, []),
              ("kestrel up (queue on core %d)" % WORKER_CORE, queue0.address, []),
              ("kestrel down, spool sync 0", dead, ["--spool-sync-ms", "0"]),
              ("kestrel down, spool sync 100", dead, ["--spool-sync-ms", "100"])]
    kinds = (("GET 1 event", 1), ("POST 50 events", 50))
    workers, samples, cpu_us = [], {}, {}
    try:
        for i, (name, kestrel, extra) in enumerate(setups):
            spool_dir = os.path.join(work, "spool-a%d" % i)
            workers.append(start_worker(work, "worker-a%d" % i, kestrel,
                                        ["--spool", spool_dir] + extra))
        # Rounds interleave the set-ups, so a burst of other work on the machine does not
        # land on one set-up only.
        for r in range(rounds):
            for i, (name, _, _) in enumerate(setups):
                for kind, batch in kinds:
                    cpu_before = cpu_seconds(workers[i].proc.pid)
                    eps, result = measure(workers[i].port, seconds, threads, batch,
                                          "b%d-%d-%d" % (r, i, batch))
                    cpu = cpu_seconds(workers[i].proc.pid) - cpu_before
                    samples.setdefault((name, kind), []).append(eps)
                    cpu_us.setdefault((name, kind), []).append(
                        cpu * 1e6 / max(1, result.acked_count))
    finally:
        for server in workers + [queue, queue0]:
            server.proc.stop(STOP_TIMEOUT_S)
    print("   %-32s %-15s %10s %8s %14s   %s" % ("set-up", "requests", "events/s", "ratio",
                                                  "worker CPU/ev", "samples (events/s)"))
    for (name, kind), values in samples.items():
        base = statistics.median(samples[(setups[0][0], kind)])
        med = statistics.median(values)
        print("   %-32s %-15s %10.0f %8.2f %11.1f us   %s" % (
            name, kind, med, med / base, statistics.median(cpu_us[(name, kind)]),
            " ".join("%.0f" % v for v in values)))
    print("   load average after: %s" % load_average())
    return samples


def load_average():
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])


def event_payload(i):
    record = {"event": "page_view", "properties": {
        "token": "bench-token", "$insert_id": "fwd-%09d" % i, "distinct_id": "user-%d" % (i % 5000),
        "time": 1795660000.123 + i / 1000.0, "mp_processing_time_ms": 1795660000123 + i,
        "$current_url": "https://example.com/pricing", "plan": "pro"}}
    return compact_json(record).encode("utf-8")


def build_spool(directory, records, batch=1000):
    started = time.monotonic()
    # sync_ms large: the bench builds the spool as fast as the disk takes it; the
    # forwarding figure is what is measured.
    spool = Spool(directory, sync_ms=10 ** 9, max_bytes=1 << 40)
    for start in range(0, records, batch):
        spool.append([("events", event_payload(i))
                      for i in range(start, min(records, start + batch))])
    spool.close()
    size = sum(os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory))
    return time.monotonic() - started, size


def queue_depth(address, queue="events"):
    with Client([address]) as client:
        stats = client.stats()[address]
    info = (stats or {}).get("queues", {}).get(queue, {})
    return int(info.get("items", 0))


def forward_time(work, records):
    print("(b) forwarding a spool of %d records: `ingest spool forward` on core %d,"
          " `ingest queue --sync-ms 100` on core %d; load average before: %s"
          % (records, WORKER_CORE, LOAD_CORE, load_average()))
    spool_dir = os.path.join(work, "spool-b")
    built_s, size = build_spool(spool_dir, records)
    segs = len([n for n in os.listdir(spool_dir) if n.endswith(".seg")])
    print("   built: %d bytes in %d segments in %.1f s" % (size, segs, built_s))
    queue = start_queue(work, "queue-b")
    try:
        started = time.monotonic()
        forward = ingest_argv("spool", "forward", spool_dir, "--kestrel", queue.address,
                              quiet=True)
        run = subprocess.run(pinned(WORKER_CORE, forward), capture_output=True,
                             timeout=FORWARD_CAP_S, cwd=ROOT)
        took = time.monotonic() - started
        depth = queue_depth(queue.address)
    finally:
        queue.proc.stop(STOP_TIMEOUT_S)
    left = [n for n in os.listdir(spool_dir) if n.endswith(".seg")]
    print("   forward exit %d in %.1f s: %.0f records/s, %.1f MB/s; queue depth %d; segments"
          " left %d" % (run.returncode, took, records / took, size / took / 1e6, depth, len(left)))
    print("   " + run.stdout.decode().strip())
    if run.returncode != 0 or depth != records or left:
        print("   FAILED: " + run.stderr.decode()[-2000:])
    return took, depth


def framing_cost(records, rounds):
    print("(c) framing cost per record (in-process, core %d, %d records of ~250 bytes,"
          " median of %d rounds); load average before: %s"
          % (LOAD_CORE, records, rounds, load_average()))
    pairs = [("events", event_payload(i)) for i in range(records)]
    formats = (("earlier format (1)", legacy_frame, 1, 0),
               ("current format (2)", frames.encode_frame, 2, frames.SEGMENT_HEADER_BYTES))
    cells = {}
    for _ in range(rounds):
        for name, encode, version, head in formats:
            # CPU time of this process: steadier than wall time on a shared core.
            started = time.process_time()
            data = b"\0" * head + b"".join([encode(q, p) for q, p in pairs])
            encoded = time.process_time()
            count = sum(1 for e in frames.scan(data, head, version) if e[0] is frames.FRAME)
            done = time.process_time()
            assert count == records
            cells.setdefault(name, []).append(((encoded - started) / records * 1e9,
                                               (done - encoded) / records * 1e9,
                                               (len(data) - head) / records))
    base = None
    for name, values in cells.items():
        enc = statistics.median(v[0] for v in values)
        scan = statistics.median(v[1] for v in values)
        base = base or (enc, scan)
        print("   %-20s encode %6.0f ns (x%.2f)   scan %6.0f ns (x%.2f)   %.0f bytes/record"
              % (name, enc, enc / base[0], scan, scan / base[1], values[0][2]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--records", type=int, default=1000000)
    parser.add_argument("--skip-a", action="store_true")
    parser.add_argument("--skip-b", action="store_true")
    parser.add_argument("--skip-c", action="store_true")
    args = parser.parse_args()
    os.sched_setaffinity(0, {LOAD_CORE})
    work = tempfile.mkdtemp(prefix="spool-bench-", dir="/var/tmp")
    try:
        if not args.skip_a:
            spool_path_cost(work, args.seconds, args.threads, args.rounds)
        if not args.skip_b:
            forward_time(work, args.records)
        if not args.skip_c:
            framing_cost(200000, args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
