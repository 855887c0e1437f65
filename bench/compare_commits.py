"""Two checkouts' workers under the same load at the same time: which one costs less CPU.

    git worktree add --detach /tmp/base HEAD~1
    python -m bench.compare_commits /tmp/base [--shapes single,batch50,mixed] [--rounds 5]
                                    [--duration 6] [--connections 100]

What it is for: this VM's speed drifts within seconds (the same worker took 118 to
152 us of CPU per single GET in four 6 s rounds), so two commits measured one after
the other differ by more than most changes save.  Here the worker of
BASE (another checkout of this repository, its own code and the same interpreter) and
this checkout's worker run at once, both on core 0, each under its own wrk on core 1,
writing to one bundled queue on core 1: whatever the machine does, it does to both.
For each round it prints both workers' CPU per request (from /proc) and their ratio,
this checkout's over BASE's (below 1: this one is cheaper), then the median.  Two
copies of the same commit gave 1.002 to 1.028, median 1.010.  The `mixed` shape is
`make bench`'s SDK log (bench.make_log, 10,000 requests, seed 1), replayed by one
bench.replay per worker (25 connections each) instead of wrk.

It needs wrk (Debian package `wrk`); it only talks to 127.0.0.1 and stops every process
it started by pid.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

from bench import wrk_bench
from bench.run_all import replay_at_once
from testkit.procs import ROOT, QueueServer, Worker, cpu_seconds


def start_workers(base, workdir, queue):
    """(BASE's worker, this checkout's), both started on core 0."""
    workers = []
    for name, root in (("base", base), ("this", ROOT)):
        worker = Worker(workdir, queue.address, name=name, cpu=wrk_bench.SERVER_CPU,
                        quiet=True, env=dict(os.environ, PYTHONPATH=root))
        worker.proc.cwd = root          # `python -m ingest` imports from the current directory
        workers.append(worker.start())
    return workers


def one_round(workers, shape, args, workdir):
    """CPU per request of each worker, both loaded at once."""
    if shape == "mixed":
        return replayed_round(workers, args, workdir)
    path, script, _events = wrk_bench.shape_request(shape)
    start = [cpu_seconds(w.proc.popen.pid) for w in workers]
    results = wrk_bench.run_wrks_at_once([w.port for w in workers], path, script,
                                         args.duration, args.connections, workdir)
    per = []
    for worker, r, cpu0 in zip(workers, results, start):
        per.append((cpu_seconds(worker.proc.popen.pid) - cpu0) / max(r["requests"], 1) * 1e6)
    return per


def replayed_round(workers, args, workdir):
    """one_round of the mixed SDK log: CPU per request from each worker's replay."""
    log = os.path.join(workdir, "access.log")
    if not os.path.exists(log):
        subprocess.run([sys.executable, "-m", "bench.make_log", "--requests", "10000",
                        "--seed", "1", "--out", log], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
    targets = [(name, "http://127.0.0.1:%d" % w.port, w.proc.popen.pid, None,
                os.path.join(workdir, "replay-" + name))
               for name, w in zip(("base", "this"), workers)]
    reports, _code = replay_at_once(sys.executable, log, targets, args.duration, seed=1,
                                    loadgen_cpu=wrk_bench.LOAD_CPU)
    return [r["server_cpu_us_per_request"] for r in reports]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.compare_commits",
                                description=__doc__.splitlines()[0])
    p.add_argument("base", help="another checkout of this repository")
    p.add_argument("--shapes", default="single,batch50")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--duration", type=int, default=6)
    p.add_argument("--connections", type=int, default=100)
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if not os.path.isfile(os.path.join(args.base, "ingest", "__main__.py")):
        raise SystemExit("compare_commits: %s is not a checkout of this repository" % args.base)
    if set(args.shapes.split(",")) - {"mixed"} and not shutil.which("wrk"):
        raise SystemExit("compare_commits: wrk is not installed (apt-get install wrk)")
    workdir = tempfile.mkdtemp(prefix="compare-commits-")
    queue = QueueServer(workdir, sync_ms=100, cpu=wrk_bench.LOAD_CPU, quiet=True).start()
    workers = []
    try:
        workers = start_workers(os.path.abspath(args.base), workdir, queue)
        for shape in args.shapes.split(","):
            if shape != "mixed":
                path, script, _events = wrk_bench.shape_request(shape)
                for worker in workers:                              # warm up
                    wrk_bench.run_wrk(worker.port, path, script, 1, args.connections,
                                      workdir)
            ratios = []
            for n in range(args.rounds):
                base_us, this_us = one_round(workers, shape, args, workdir)
                if not (base_us and this_us):
                    raise SystemExit("compare_commits: a worker answered no request in %s"
                                     " round %d" % (shape, n + 1))
                ratios.append(this_us / base_us)
                print("%s round %d: base %.1f us CPU/request, this %.1f, ratio %.3f"
                      % (shape, n + 1, base_us, this_us, ratios[-1]), flush=True)
            print("%s: median ratio this/base %.3f over %d rounds"
                  % (shape, statistics.median(ratios), args.rounds), flush=True)
    finally:
        for worker in workers:
            worker.proc.stop()
        queue.proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
