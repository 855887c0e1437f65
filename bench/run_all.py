"""One command for the headline figure: worker vs bare eventlet, same run, pinned cores.

    python -m bench.run_all [--out DIR] [--duration S] [--requests N] [--log FILE] ...

What it does, on a 2-core machine:
  core 0: the server under test, one at a time: first bench.hello (the bare eventlet
          hello-world), then `ingest serve` (both started pinned with `taskset -c 0`; the
          one not under load sits idle)
  core 1: the load generator (bench.replay) and the bundled `ingest queue` the worker
          writes to, so the worker's core does nothing but serve HTTP
Then it prints the ratio worker/hello and leaves report.json, report.md and the plots in
the output directory (one round-N/ directory per round with --rounds), plus
queue_stats.json (what reached the queue) as a sanity check and, for the worker,
summary.json with every round's ratio and their median.

--together N adds N rounds with both servers under load at the same time, both on core
0, each replayed by its own bench.replay on core 1 (together-N/hello and together-N/worker).
This machine's speed drifts within seconds (the hello-world took 184 to 234 us of CPU
per mixed-log request in three rounds of one run), which the alternating rounds see as
noise in their ratio; at once, the drift hits both alike.  Their ratio is the
hello-world's CPU per request over the worker's (from /proc): with the core shared,
requests/s follow the scheduler's split, not the servers' speed.

It only starts processes on 127.0.0.1 and stops each of them by pid when done.
"""
import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse

from bench.replay import start_hello
from testkit.procs import ROOT, QueueServer, Worker, pinned


START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 15.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="output directory (default bench/out/run-<time>)")
    p.add_argument("--log", default=None, help="access log to replay (default: make one)")
    p.add_argument("--requests", type=int, default=10000, help="size of the generated log")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--duration", type=float, default=15.0, help="seconds of load per server")
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=25)
    p.add_argument("--rate", type=float, default=None, help="open-loop total requests/s")
    p.add_argument("--server-cpu", type=int, default=0, help="core for the server under test")
    p.add_argument("--loadgen-cpu", type=int, default=1, help="core for load generator + queue")
    p.add_argument("--sync-ms", type=int, default=100, help="queue fsync period (ingest queue)")
    p.add_argument("--hello-only", action="store_true", help="skip the worker")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat hello + worker this many times (round-N/ each); the median "
                        "ratio is printed, which steadies figures on a shared machine")
    p.add_argument("--together", type=int, default=0, metavar="ROUNDS",
                   help="then this many rounds of both servers loaded at the same time "
                        "(together-N/ each); their median ratio by CPU per request is "
                        "printed too")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.together < 0:
        p.error("--rounds must be at least 1 and --together at least 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    out = os.path.abspath(args.out or os.path.join(ROOT, "bench", "out",
                                                   time.strftime("run-%Y%m%d-%H%M%S")))
    os.makedirs(out, exist_ok=True)
    py = sys.executable
    log = args.log
    if log is None:
        log = os.path.join(out, "access.log")
        subprocess.run([py, "-m", "bench.make_log", "--requests", str(args.requests),
                        "--out", log, "--seed", str(args.seed)], cwd=ROOT, check=True)
    queue_data = tempfile.mkdtemp(prefix="bench-queue-")
    procs = []
    try:
        ports = _start_servers(args, out, queue_data, procs)
        reports, codes = [], []
        for i in range(args.rounds):
            round_out = out if args.rounds == 1 else os.path.join(out, "round-%d" % (i + 1))
            report, code = _replay(args, py, round_out, log, ports, seed=args.seed + i)
            reports.append(report)
            codes.append(code)
        together = []
        if not args.hello_only:
            for i in range(args.together):
                pair = _replay_together(args, py, os.path.join(out, "together-%d" % (i + 1)),
                                        log, ports, seed=args.seed + i)
                together.append(pair)
                codes.append(pair[2])
            _queue_stats(py, ports["queue"], out)
    finally:
        for proc in reversed(procs):
            proc.stop(STOP_TIMEOUT_S)
        shutil.rmtree(queue_data, ignore_errors=True)
    _print_summary(args, out, reports, together)
    # bench.replay's own verdict: more records rejected than --max-rejected allows.
    return max(codes)


def _print_summary(args, out, reports, together):
    print()
    for i, report in enumerate(reports, 1):
        base = report["baseline"]
        line = ("round %d: hello-world %.0f req/s (p50 %s ms, p99 %s ms)"
                % (i, base["ok_rps"], base["latency_ms"]["p50"], base["latency_ms"]["p99"]))
        if not args.hello_only:
            line += ("; worker %.0f req/s (p50 %s ms, p99 %s ms); ratio worker/hello %.3f, "
                     "by server CPU per request %s"
                     % (report["ok_rps"], report["latency_ms"]["p50"],
                        report["latency_ms"]["p99"], report["ratio"]["ok_rps"],
                        report["ratio"]["cpu_per_request"]))
        print(line)
    if not args.hello_only:
        ratios = sorted(r["ratio"]["ok_rps"] for r in reports)
        cpu_ratios = sorted(r["ratio"]["cpu_per_request"] or 0.0 for r in reports)
        summary = {"ratios": ratios, "median_ratio": round(statistics.median(ratios), 3),
                   "cpu_ratios": cpu_ratios,
                   "median_cpu_ratio": round(statistics.median(cpu_ratios), 3),
                   "worker_ok_rps": [r["ok_rps"] for r in reports],
                   "hello_ok_rps": [r["baseline"]["ok_rps"] for r in reports]}
        if together:
            summary["together"] = _together_summary(together)
        with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as fh:
            json.dump(summary, fh, indent=2)
        print("ratio worker/hello, median of %d: throughput %.3f, server CPU per request %.3f"
              % (len(ratios), summary["median_ratio"], summary["median_cpu_ratio"]))
        if together:
            print("ratio worker/hello at the same time, median of %d: server CPU per request "
                  "%.3f" % (len(together), summary["together"]["median_cpu_ratio"]))
    print("reports under: %s" % out)


def _start_servers(args, out, queue_data, procs):
    """hello, then the queue and the worker, each polled until it listens; every started
    Proc is appended to `procs` for main() to stop.  Returns their ports and pids."""
    hello, url = start_hello(args.server_cpu, out, START_TIMEOUT_S)
    procs.append(hello)
    ports = {"hello_url": url, "hello_pid": hello.pid}
    _listening("hello", urllib.parse.urlsplit(url).port, hello.pid)
    if not args.hello_only:
        queue = QueueServer(queue_data, sync_ms=args.sync_ms, name="queue",
                            cpu=args.loadgen_cpu, logdir=out)
        procs.append(queue.proc)
        queue.start(START_TIMEOUT_S)
        _listening("queue", queue.port, queue.proc.pid)
        worker = Worker(queue_data, queue.address, name="worker", cpu=args.server_cpu,
                        logdir=out)
        procs.append(worker.proc)
        worker.start(START_TIMEOUT_S)
        _listening("worker", worker.port, worker.proc.pid)
        ports.update(queue=queue.port, queue_pid=queue.proc.pid,
                     worker=worker.port, worker_pid=worker.proc.pid)
    return ports


def _listening(name, port, pid):
    print("run_all: %s listening on %d (pid %d)" % (name, port, pid), file=sys.stderr)


def _replay(args, py, out, log, ports, seed):
    """One bench.replay invocation: the hello-world, then the worker; returns
    (report.json, its exit status: 0, or 3 when too many records were rejected)."""
    hello_url = ports["hello_url"]
    replay = [py, "-m", "bench.replay", "--log", log, "--out", out,
              "--processes", str(args.processes), "--concurrency", str(args.concurrency),
              "--duration", str(args.duration), "--cpus", str(args.loadgen_cpu),
              "--baseline-url", hello_url, "--baseline-pid", str(ports["hello_pid"]),
              "--seed", str(seed),
              "--note", "servers pinned to core %d (taskset); load generator and queue "
                        "pinned to core %d" % (args.server_cpu, args.loadgen_cpu),
              "--note", "started by: python -m bench.run_all %s" % shlex.join(sys.argv[1:])]
    if args.rate:
        replay += ["--rate", str(args.rate)]
    if args.hello_only:
        # The hello server is both the baseline and the target: a self-check of the setup.
        replay += ["--url", hello_url, "--server-pid", str(ports["hello_pid"]),
                   "--label", "hello-world again"]
    else:
        replay += ["--url", "http://127.0.0.1:%d" % ports["worker"],
                   "--server-pid", str(ports["worker_pid"]), "--label", "worker",
                   "--helper-pid", str(ports["queue_pid"])]
    done = subprocess.run(pinned(args.loadgen_cpu, replay), cwd=ROOT)
    if done.returncode not in (0, 3):
        raise SystemExit("run_all: bench.replay failed with status %d" % done.returncode)
    with open(os.path.join(out, "report.json"), encoding="utf-8") as fh:
        return json.load(fh), done.returncode


def replay_at_once(py, log, targets, duration, seed, concurrency=25, processes=1,
                   loadgen_cpu=1, rate=None):
    """One bench.replay per target, all started at once (each pinned to `loadgen_cpu`
    unless it is None, each paced at `rate` requests/s if given), none with a baseline,
    each writing its output to replay.log in its out directory.  `targets`: (label, url,
    server pid, helper pid or None, out directory).  Returns ([report.json of each], the
    highest exit status)."""
    running = []
    try:
        for label, url, pid, helper, out in targets:
            argv = [py, "-m", "bench.replay", "--log", log, "--out", out, "--url", url,
                    "--server-pid", str(pid), "--label", label,
                    "--processes", str(processes), "--concurrency", str(concurrency),
                    "--duration", str(duration), "--seed", str(seed),
                    "--note", "replayed at the same time as: %s" % ", ".join(
                        t[0] for t in targets if t[0] != label)]
            if loadgen_cpu is not None:
                argv += ["--cpus", str(loadgen_cpu)]
            if rate:
                argv += ["--rate", str(rate)]
            if helper:
                argv += ["--helper-pid", str(helper)]
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "replay.log"), "w", encoding="utf-8") as log_file:
                running.append(subprocess.Popen(pinned(loadgen_cpu, argv), cwd=ROOT,
                                                stdout=log_file, stderr=subprocess.STDOUT))
        codes = [proc.wait(timeout=duration * 4 + 120) for proc in running]
    finally:
        for proc in running:          # interrupted: SIGTERM lets replay stop its children
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    if any(code not in (0, 3) for code in codes):
        raise SystemExit("bench.replay failed with status %s (its output: replay.log in %s)"
                         % (codes, ", ".join(t[4] for t in targets)))
    reports = []
    for target in targets:
        with open(os.path.join(target[4], "report.json"), encoding="utf-8") as fh:
            reports.append(json.load(fh))
    return reports, max(codes)


def _replay_together(args, py, out, log, ports, seed):
    """One --together round: (hello's report, the worker's, exit status)."""
    targets = [("hello-world", ports["hello_url"], ports["hello_pid"], None,
                os.path.join(out, "hello")),
               ("worker", "http://127.0.0.1:%d" % ports["worker"], ports["worker_pid"],
                ports["queue_pid"], os.path.join(out, "worker"))]
    (hello, worker), code = replay_at_once(py, log, targets, args.duration, seed,
                                           args.concurrency, args.processes, args.loadgen_cpu,
                                           args.rate)
    print("together: hello-world %.0f req/s, %s us CPU per request; worker %.0f req/s, "
          "%s us; ratio worker/hello by CPU per request %.3f"
          % (hello["ok_rps"], hello["server_cpu_us_per_request"], worker["ok_rps"],
             worker["server_cpu_us_per_request"], _cpu_ratio(hello, worker)), flush=True)
    return hello, worker, code


def _cpu_ratio(hello, worker):
    """hello-world's CPU per request over the worker's; 0.0 when either answered nothing."""
    if not (hello["server_cpu_us_per_request"] and worker["server_cpu_us_per_request"]):
        return 0.0
    return hello["server_cpu_us_per_request"] / worker["server_cpu_us_per_request"]


def _together_summary(together):
    ratios = sorted(_cpu_ratio(hello, worker) for hello, worker, _code in together)
    summary = {"cpu_ratios": [round(r, 3) for r in ratios],
               "median_cpu_ratio": round(statistics.median(ratios), 3)}
    for i, name in enumerate(("hello", "worker")):
        summary[name + "_cpu_us_per_request"] = [
            pair[i]["server_cpu_us_per_request"] for pair in together]
        summary[name + "_ok_rps"] = [pair[i]["ok_rps"] for pair in together]
    return summary


def _queue_stats(py, queue_port, out):
    """What reached the queue: evidence that the worker did the whole job."""
    res = subprocess.run([py, "-m", "ingest", "stats", "--kestrel", "127.0.0.1:%d" % queue_port,
                          "--json"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    with open(os.path.join(out, "queue_stats.json"), "w", encoding="utf-8") as fh:
        fh.write(res.stdout if res.returncode == 0 else json.dumps({"error": res.stderr[-2000:]}))


if __name__ == "__main__":
    sys.exit(main())
