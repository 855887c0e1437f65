"""Read-behind benchmark of the bundled queue server: a backlog far bigger than memory.

Stand-alone script, not a test.  Starts `ingest queue --sync-ms 100` pinned to core 1
with `max_memory_bytes` = --bound-mib for every queue, a data directory under /tmp
(about 1.05 KiB of disk per item), this load client on core 0, and over raw sockets:

1. fills one queue with --items 1 KiB items, pipelined 100 sets per write: sets/s while
   it still fits in memory (the first --memory-items), then while behind, window by
   window (--window sets), each window paired with as many sets on a second queue that
   stays in memory (flushed after each window); the ratio reported is the median of
   the windows' ratios, so the drift of a shared machine cancels out;
2. restarts the server twice (SIGTERM, then SIGKILL) and times from the process start
   to the first answered `get` with the whole backlog on disk;
3. drains the queue with pipelined gets (100 per write), checking every item comes back
   once and in order: gets/s while behind and once the backlog is read;
4. throughout: the server's peak RSS (sampled every 5 ms) and the event loop's stalls,
   the round trip of a `version` sent every 10 ms on a separate connection (max and
   99th percentile), which shows whether journal rewrites or reading back hold the loop.

Bounded: a fixed item count and a wall-clock cap per phase; the server is stopped by
pid and the data directory removed at the end.  Usage:

    .venv/bin/python bench/queue_backlog_bench.py [--items 2000000] [--bound-mib 64]
"""
import argparse
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from testkit.procs import QueueServer, port_open, rss_kib  # noqa: E402

ITEM = 1024
BATCH = 100
PHASE_CAP_S = 600.0
QUEUE = b"backlog"


class Sampler:
    """Peak RSS of the server and `version` round trips, in a separate process (so the
    load client's GIL does not stretch the round trips), until `finish()`."""

    def __init__(self, server):
        self.server = server
        self.stop_flag = multiprocessing.Event()
        self.results, child = multiprocessing.Pipe(duplex=False)
        self.proc = multiprocessing.Process(target=_sample, daemon=True, args=(
            server.host, server.port, server.proc.pid, self.stop_flag, child))
        self.proc.start()

    def finish(self):
        self.stop_flag.set()
        peak_kib, rtts = self.results.recv() if self.results.poll(10) else (0, [])
        self.proc.join(5)
        rtts = sorted(rtts) or [0.0]
        return {"peak_rss_mib": round(peak_kib / 1024, 1),
                "version_rtt_ms_max": round(rtts[-1] * 1000, 2),
                "version_rtt_ms_p99": round(rtts[int(len(rtts) * 0.99)] * 1000, 2),
                "version_rtt_samples": len(rtts)}


def _sample(host, port, pid, stop_flag, results):
    peak_kib, rtts = 0, []
    try:
        sock = socket.create_connection((host, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        next_ping = 0.0
        while not stop_flag.is_set():
            peak_kib = max(peak_kib, rss_kib(pid))
            now = time.monotonic()
            if now >= next_ping:
                sock.sendall(b"version\r\n")
                if not sock.recv(256).startswith(b"VERSION"):
                    break
                rtts.append(time.monotonic() - now)
                next_ping = now + 0.01
            time.sleep(0.005)    # sampling period, not a wait for a condition
    except (OSError, AssertionError):
        pass                     # the server went away: report what was measured
    results.send((peak_kib, rtts))


def item(i):
    return b"%012d" % i + b"x" * (ITEM - 12)


def connect(server):
    sock = socket.create_connection((server.host, server.port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_exact(sock, n, buf):
    while len(buf) < n:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise SystemExit("server closed the connection")
        buf += chunk
    return buf


def fill(server, first, last, queue=QUEUE):
    """Sets of items first..last-1 on `queue`, BATCH per write; returns seconds."""
    sock = connect(server)
    reply = b"STORED\r\n" * BATCH
    start = time.monotonic()
    for i in range(first, last, BATCH):
        n = min(BATCH, last - i)
        sock.sendall(b"".join(b"set %s 0 0 %d\r\n%s\r\n" % (queue, ITEM, item(j))
                              for j in range(i, i + n)))
        got = read_exact(sock, len(reply[:8 * n]), bytearray())
        if bytes(got) != reply[:8 * n]:
            raise SystemExit("unexpected replies: %r" % bytes(got[:100]))
        if time.monotonic() - start > PHASE_CAP_S:
            raise SystemExit("fill took longer than %d s" % PHASE_CAP_S)
    if queue != QUEUE:
        sock.sendall(b"flush %s\r\n" % queue)     # it stays in memory, window after window
        read_exact(sock, 5, bytearray())
    sock.close()
    return time.monotonic() - start


def paired_fill(server, first, last, window):
    """Sets on the queue that is behind, window by window, each window followed by the
    same number of sets on a queue that stays in memory (flushed after each window):
    the median of the per-window ratios cancels the drift of a shared machine."""
    behind_s, memory_s, ratios = 0.0, 0.0, []
    for i in range(first, last, window):
        j = min(last, i + window)
        b = fill(server, i, j)
        m = fill(server, i, j, queue=b"inmemory")
        behind_s, memory_s = behind_s + b, memory_s + m
        ratios.append(m / b)
    ratios.sort()
    return behind_s, memory_s, ratios[len(ratios) // 2]


def drain(server, first, last, empty_after=False):
    """Gets of items first..last-1 (checked), BATCH per write; returns seconds."""
    sock = connect(server)
    header = b"VALUE %s 0 %d\r\n" % (QUEUE, ITEM)
    one = len(header) + ITEM + 2 + 5
    start = time.monotonic()
    buf = bytearray()
    for i in range(first, last, BATCH):
        n = min(BATCH, last - i)
        sock.sendall(b"get %s\r\n" % QUEUE * n)
        buf = read_exact(sock, one * n, buf)
        for j in range(n):
            at = j * one
            if buf[at:at + len(header)] != header or \
                    buf[at + len(header):at + len(header) + 12] != b"%012d" % (i + j):
                raise SystemExit("item %d missing or out of order: %r" % (i + j, buf[at:at + 40]))
        del buf[:one * n]
        if time.monotonic() - start > PHASE_CAP_S:
            raise SystemExit("drain took longer than %d s" % PHASE_CAP_S)
    secs = time.monotonic() - start
    if empty_after:
        sock.sendall(b"get %s\r\n" % QUEUE)
        end = bytes(read_exact(sock, 5, bytearray()))
        if end != b"END\r\n":
            raise SystemExit("the queue holds more than was put: %r" % end[:60])
    sock.close()
    return secs


def first_answer(server, kill):
    """Stop the server (SIGKILL or SIGTERM), start it, time the first answered get."""
    if kill:
        server.proc.kill()
    else:
        server.proc.stop(timeout=60)
    started = time.monotonic()
    server.proc.start()
    while not port_open(server.host, server.port):
        if not server.proc.alive():
            raise SystemExit("server exited at restart:\n" + server.proc.output())
        time.sleep(0.005)   # poll interval
    sock = connect(server)
    sock.sendall(b"get %s/peek\r\n" % QUEUE)
    reply = b""
    while b"\r\n" not in reply:
        chunk = sock.recv(4096)
        if not chunk:
            raise SystemExit("server closed the connection at restart")
        reply += chunk
    sock.close()
    return time.monotonic() - started


def rate(n, secs):
    return round(n / secs) if secs else 0


def queue_stat(server, name):
    sock = connect(server)
    sock.sendall(b"stats\r\n")
    text = b""
    while not text.endswith(b"END\r\n"):
        chunk = sock.recv(65536)
        if not chunk:
            raise SystemExit("server closed the connection")
        text += chunk
    sock.close()
    key = b"STAT queue_%s_%s " % (QUEUE, name.encode())
    return int(text.split(key, 1)[1].split(b"\r\n", 1)[0])


def sampled(server, out, phase, work):
    """Run `work()` with a Sampler; its figures go to out[phase]; returns work()."""
    sampler = Sampler(server)
    try:
        return work()
    finally:
        out[phase] = sampler.finish()


def idle_rewrite(server, out):
    """With no client load, wait (up to PHASE_CAP_S) for the rewrite the drain asked
    for; the samples show what the rewrite alone does to the event loop."""
    def work():
        before, start = queue_stat(server, "journal_rewrites"), time.monotonic()
        while queue_stat(server, "journal_rewrites") == before:
            if time.monotonic() - start > PHASE_CAP_S:
                raise SystemExit("no journal rewrite after %d s" % PHASE_CAP_S)
            time.sleep(0.05)    # poll interval
        return time.monotonic() - start
    out["rewrite_idle_s"] = round(sampled(server, out, "rewrite_idle", work), 2)


def run(args, tmp):
    config = os.path.join(tmp, "queue.json")
    with open(config, "w") as fh:
        json.dump({"default": {"max_memory_bytes": args.bound_mib << 20}}, fh)
    server = QueueServer(tmp, sync_ms=100, extra=("--config", config), name="backlog",
                         cpu=args.server_cpu, quiet=True, logdir=tmp).start()
    n, mem = args.items, args.memory_items
    out = {"items": n, "bound_mib": args.bound_mib, "server_cpu": args.server_cpu,
           "idle_rss_mib": round(rss_kib(server.proc.pid) / 1024, 1)}
    try:
        out["restart_s_empty"] = round(first_answer(server, kill=False), 2)
        sampled(server, out, "idle", lambda: time.sleep(2))   # the loop's baseline
        secs = sampled(server, out, "fill_memory", lambda: fill(server, 0, mem))
        out["sets_per_s_first_in_memory"] = rate(mem, secs)
        behind_s, memory_s, ratio = sampled(server, out, "fill_behind", lambda: paired_fill(
            server, mem, n, args.window))
        out["sets_per_s_behind"] = rate(n - mem, behind_s)
        out["sets_per_s_in_memory_paired"] = rate(n - mem, memory_s)
        out["sets_ratio_behind_to_memory"] = round(ratio, 3)
        out["journal_bytes"] = os.path.getsize(os.path.join(server.data, QUEUE.decode()))
        out["restart_s_after_sigterm"] = round(first_answer(server, kill=False), 2)
        out["restart_s_after_kill9"] = round(first_answer(server, kill=True), 2)
        out["rss_mib_after_restart"] = round(rss_kib(server.proc.pid) / 1024, 1)
        # 80 % drained: the journal is > 4x its live records, a rewrite is under way
        part = n * 4 // 5
        secs = sampled(server, out, "drain_behind", lambda: drain(server, 0, part))
        idle_rewrite(server, out)
        secs += sampled(server, out, "drain_behind_2", lambda: drain(server, part, n - mem))
        out["gets_per_s_behind"] = rate(n - mem, secs)
        secs = sampled(server, out, "drain_memory",
                       lambda: drain(server, n - mem, n, empty_after=True))
        out["gets_per_s_in_memory"] = rate(mem, secs)
        out["log_tail"] = server.proc.output(3000).strip().splitlines()[-6:]
    finally:
        out["exit"] = server.proc.stop(timeout=60)
        if args.verbose:
            print(server.proc.output(20000))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=2000000)
    ap.add_argument("--bound-mib", type=int, default=64)
    ap.add_argument("--memory-items", type=int, default=50000,
                    help="items set before the queue reaches its bound")
    ap.add_argument("--window", type=int, default=20000,
                    help="sets per window of the paired behind / in-memory comparison")
    ap.add_argument("--server-cpu", type=lambda v: None if v == "none" else int(v),
                    default=1, help="core the server is pinned to ('none': not pinned,"
                    " so the rewrite's native thread can run on another core)")
    ap.add_argument("--verbose", action="store_true", help="print the server's log")
    args = ap.parse_args()
    os.sched_setaffinity(0, {0})     # the load client on core 0, the server on core 1
    tmp = tempfile.mkdtemp(prefix="queue-backlog-bench-", dir="/tmp")
    load = os.getloadavg()
    try:
        out = run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out["loadavg_before"] = [round(x, 2) for x in load]
    out["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    out["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                   capture_output=True, text=True).stdout.strip()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
