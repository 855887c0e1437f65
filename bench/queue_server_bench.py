"""Throughput and memory benchmark of the bundled queue server (`ingest queue`).

Stand-alone script, not a test.  Starts `ingest queue` pinned to core 1 (taskset -c 1) on
a free loopback port with a temporary data directory, pins this load client to core 0,
and over raw sockets:

1. pipelines `set` commands of 1 KiB items, BATCH per write, reading every reply of a
   batch before sending the next (what the client's add_many does), for --sync-ms 100
   and --sync-ms 0; prints items/s for each;
   plus --sync-ms 0 with 4 connections at once (group commit shares their fsyncs);
2. queues 1,000,000 items of 64 bytes and prints the server's VmRSS.

Bounded: a fixed item count per run, a wall-clock cap per phase; every server it starts
is stopped by pid and its data directory removed.  Usage:

    .venv/bin/python bench/queue_server_bench.py [--items 200000] [--batch 100]
"""
import argparse
import os
import shutil
import socket
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from testkit.procs import QueueServer, cpu_seconds, rss_kib  # noqa: E402

PHASE_CAP_S = 40.0


def start_server(tmp, name, sync_ms, core):
    """`ingest queue` pinned to `core`, data and logs under `tmp`, polled until it listens."""
    return QueueServer(tmp, sync_ms=sync_ms, name=name, cpu=core, quiet=True,
                       logdir=tmp).start()


def read_replies(sock, count, expect=b"STORED\r\n"):
    """Read exactly `count` replies of the form `expect`."""
    want = count * len(expect)
    got = bytearray()
    while len(got) < want:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise SystemExit("server closed the connection")
        got += chunk
    if bytes(got) != expect * count:
        raise SystemExit("unexpected replies: %r" % bytes(got[:200]))


def pipelined_sets(port, queue, item_bytes, items, batch):
    """Send `items` sets, `batch` per write, waiting for each batch's replies."""
    payload = b"x" * item_bytes
    one = b"set %s 0 0 %d\r\n%s\r\n" % (queue.encode(), item_bytes, payload)
    block = one * batch
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sent = 0
    start = time.monotonic()
    try:
        while sent < items and time.monotonic() - start < PHASE_CAP_S:
            n = min(batch, items - sent)
            sock.sendall(block if n == batch else one * n)
            read_replies(sock, n)
            sent += n
    finally:
        sock.close()
    return sent, time.monotonic() - start


def parallel_sets(port, conns, item_bytes, items, batch):
    """`conns` connections (threads) each doing pipelined_sets on its own queue."""
    results = [None] * conns

    def run(i):
        results[i] = pipelined_sets(port, "bench%d" % i, item_bytes, items // conns, batch)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(conns)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if any(r is None for r in results):
        raise SystemExit("a load thread failed")
    return sum(r[0] for r in results), time.monotonic() - start


def throughput(tmp, sync_ms, items, batch, conns=1):
    server = start_server(tmp, "sync%d-c%d" % (sync_ms, conns), sync_ms, core=1)
    try:
        pipelined_sets(server.port, "warmup", 1024, 5000, batch)
        cpu0 = cpu_seconds(server.proc.pid)
        sent, secs = parallel_sets(server.port, conns, 1024, items, batch)
        cpu = cpu_seconds(server.proc.pid) - cpu0
    finally:
        code = server.proc.stop(timeout=15)
    rate = sent / secs
    # The server's own CPU per item tells what one free core sustains even when other
    # processes share the machine and wall-clock rates get noisy.
    print("sync-ms %-4d %d conn  %7d x 1 KiB sets, batch %d: %.2f s  %8.0f items/s;"
          " server CPU %.2f s = %.1f us/item  (exit %s)"
          % (sync_ms, conns, sent, batch, secs, rate, cpu, cpu * 1e6 / sent, code),
          flush=True)
    return rate


def memory(tmp, count, batch):
    server = start_server(tmp, "rss", 100, core=1)
    try:
        idle = rss_kib(server.proc.pid)
        sent, secs = pipelined_sets(server.port, "small", 64, count, batch)
        full = rss_kib(server.proc.pid)
    finally:
        code = server.proc.stop(timeout=15)
    print("RSS idle %.1f MiB; with %d x 64 B items queued %.1f MiB (%.0f B/item);"
          " loaded in %.1f s (%.0f items/s)  (exit %s)"
          % (idle / 1024, sent, full / 1024, (full - idle) * 1024 / max(sent, 1), secs,
             sent / secs, code), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=200000, help="1 KiB sets per sync setting")
    ap.add_argument("--batch", type=int, default=100, help="sets per write")
    ap.add_argument("--rss-items", type=int, default=1000000)
    args = ap.parse_args()
    os.sched_setaffinity(0, {0})     # the load client on core 0, the server on core 1
    tmp = tempfile.mkdtemp(prefix="queue-bench-")
    try:
        for sync_ms in (100, 0):
            throughput(tmp, sync_ms, args.items, args.batch)
        # several connections waiting at once share fsyncs (group commit)
        throughput(tmp, 0, args.items, args.batch, conns=4)
        memory(tmp, args.rss_items, 1000)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
