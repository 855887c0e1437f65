"""Write throughput of the Kestrel client (put_many / add_many) against `ingest queue`.

Stand-alone script, not a test.  For --sync-ms 100 and then 0 it starts `ingest queue`
pinned to core 1 (taskset -c 1) on a free loopback port with a temporary data directory,
pins this process to core 0, and for batch sizes 50 and 500 calls put_many and add_many
with 1 KiB items for a fixed time each, printing items/s.  Each case writes to its own
queue, deleted afterwards so the disk does not fill up.

Bounded: --seconds per case (default 2.5 s; 8 cases, so well under a minute in all); every
server it starts is stopped by pid and its data directory removed.  Usage:

    .venv/bin/python bench/kestrel_client_bench.py [--seconds 2.5] [--item-bytes 1024] [--json]
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ingest.kestrel import Client  # noqa: E402
from testkit.procs import QueueServer  # noqa: E402

SYNC_MS = (100, 0)
BATCHES = (50, 500)
FLOOR_ITEMS_PER_S = 30000  # the floor for 1 KiB items with --sync-ms 100


def run_case(client, method, queue, batch, item_bytes, seconds):
    """Call `method` with `batch` items until `seconds` pass.

    Returns (items/s, this process's CPU microseconds per item): the second figure is the
    client's own cost, which does not depend on how busy the server's core is.
    """
    item = b"x" * item_bytes
    pairs = [(queue, item)] * batch
    items = [item] * batch
    done = 0
    cpu = time.process_time()
    start = time.perf_counter()
    end = start + seconds
    while time.perf_counter() < end:
        if method == "put_many":
            client.put_many(pairs)
        elif not client.add_many(queue, items):
            raise SystemExit("add_many failed")
        done += batch
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu
    stored = client.stats()[client.servers[0]]["queues"][queue]["items"]
    if stored != done:
        raise SystemExit("%s: %d items sent, %d on the queue" % (queue, done, stored))
    client.delete(queue)
    return done / elapsed, cpu / done * 1e6


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.5, help="duration of each case")
    ap.add_argument("--item-bytes", type=int, default=1024)
    ap.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = ap.parse_args(argv)
    if args.seconds > 6:
        raise SystemExit("--seconds is capped at 6 so the whole run stays under a minute")
    os.sched_setaffinity(0, {0})
    tmp = tempfile.mkdtemp(prefix="kestrel-client-bench-")
    results = []
    try:
        for sync_ms in SYNC_MS:
            # Data and logs under tmp; polled until it listens, stopped by pid below.
            server = QueueServer(tmp, sync_ms=sync_ms, name="queue-sync%d" % sync_ms, cpu=1,
                                 quiet=True, logdir=tmp).start()
            try:
                client = Client([server.address])
                for batch in BATCHES:
                    for method in ("put_many", "add_many"):
                        queue = "bench_%s_%d_%d" % (method, batch, sync_ms)
                        rate, cpu_us = run_case(client, method, queue, batch, args.item_bytes,
                                        args.seconds)
                        results.append({"sync_ms": sync_ms, "batch": batch,
                                        "method": method, "items_per_s": round(rate),
                                        "client_cpu_us_per_item": round(cpu_us, 2)})
                        print("sync-ms %3d  batch %3d  %-8s  %8d items/s of %d B"
                              "  (client CPU %.2f us/item)"
                              % (sync_ms, batch, method, rate, args.item_bytes, cpu_us),
                              flush=True)
                client.close()
            finally:
                server.proc.stop(timeout=15)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    best = max(r["items_per_s"] for r in results if r["sync_ms"] == 100)
    print("best with --sync-ms 100: %d items/s (floor %d: %s)"
          % (best, FLOOR_ITEMS_PER_S, "met" if best >= FLOOR_ITEMS_PER_S else "NOT met"))
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
