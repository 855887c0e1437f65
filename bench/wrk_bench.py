"""The worker's HTTP speed against a bare eventlet hello-world, with wrk, in the same run.

    python -m bench.wrk_bench [--shapes single,batch50] [--rounds 3] [--duration 10]
                              [--connections 100] [--out DIR] [--profile]

What it does, on a 2-core machine: the server under test on core 0 (first bench.hello,
then `ingest serve`, alternating, `--rounds` times), wrk and the bundled `ingest queue`
(`--sync-ms 100`) on core 1.  For each shape it prints requests/s (and events/s),
server CPU per request from /proc, p50/p99 from wrk's --latency, and the worker/hello
ratio of each round and their median.  Shapes:

    single    GET /track?ip=1&data=<base64 of one 9-property event>  (the Node/Python shape)
    batch50   POST /track form body data=<base64 of 50 events>       (the browser SDK's)

With --profile, the worker also runs under cProfile for one extra round of the first
shape and the top functions by own time are printed (and written to DIR/profile.txt):
where the next person should look.

It needs wrk (Debian package `wrk`); it only talks to 127.0.0.1 and stops every process
it started by pid.
"""
import argparse
import base64
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from testkit.procs import (LOOPBACK, Proc, QueueServer, Worker, cpu_seconds, free_port,
                           pinned, rss_kib)

SERVER_CPU, LOAD_CPU = 0, 1
TOKEN = "wrk-bench"


def event(i):
    """A 9-property event like the Node SDK's."""
    return {"event": "Signed Up", "properties": {
        "token": TOKEN, "distinct_id": "user-%d" % i, "$insert_id": "ins%016d" % i,
        "time": int(time.time() * 1000), "mp_lib": "node", "$lib_version": "0.18.0",
        "plan": "premium", "amount": 12.5, "source": "landing-page"}}


def b64(value):
    return base64.b64encode(json.dumps(value, separators=(",", ":")).encode()).decode()


def shape_request(name):
    """(path, wrk lua script or None, events per request)."""
    if name == "single":
        return "/track?ip=1&data=" + b64(event(1)), None, 1
    if name == "batch50":
        body = "data=" + b64([event(i) for i in range(50)])
        script = ('wrk.method = "POST"\nwrk.body = "%s"\n'
                  'wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"\n' % body)
        return "/track?ip=1", script, 50
    raise SystemExit("unknown shape %r" % name)


_LATENCY = re.compile(r"^\s+(50|99)(?:\.000)?%\s+([\d.]+)(us|ms|s)\s*$", re.M)
_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def run_wrk(port, path, script, duration, connections, workdir):
    argv = ["wrk", "-t1", "-c%d" % connections, "-d%ds" % duration, "--latency"]
    if script:
        script_path = os.path.join(workdir, "request.lua")
        with open(script_path, "w") as fh:
            fh.write(script)
        argv += ["-s", script_path]
    argv.append("http://%s:%d%s" % (LOOPBACK, port, path))
    out = subprocess.run(pinned(LOAD_CPU, argv), capture_output=True, text=True,
                         timeout=duration + 30).stdout
    total = re.search(r"(\d+) requests in ([\d.]+)(s|m)", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    lat = {p: float(v) * _UNIT[u] for p, v, u in _LATENCY.findall(out)}
    return {"requests": int(total.group(1)), "seconds": float(total.group(2)),
            "non_2xx": int(bad.group(1)) if bad else 0,
            "socket_errors": errors.group(1) if errors else "",
            "p50_ms": lat.get("50"), "p99_ms": lat.get("99")}


def measure(pid, port, shape, args, workdir):
    path, script, events = shape_request(shape)
    run_wrk(port, path, script, 1, args.connections, workdir)       # warm up
    cpu0 = cpu_seconds(pid)
    result = run_wrk(port, path, script, args.duration, args.connections, workdir)
    cpu = cpu_seconds(pid) - cpu0
    result["rps"] = result["requests"] / result["seconds"]
    result["events_per_s"] = result["rps"] * events
    result["cpu_us_per_request"] = cpu / max(result["requests"], 1) * 1e6
    result["rss_mib"] = rss_kib(pid) / 1024.0
    result["peak_rss_mib"] = peak_rss_kib(pid) / 1024.0
    return result


def peak_rss_kib(pid):
    with open("/proc/%d/status" % pid) as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def start_hello(workdir):
    port = free_port()
    argv = [sys.executable, "-W", "ignore", "-m", "bench.hello", "--port", str(port)]
    proc = Proc("hello", pinned(SERVER_CPU, argv), os.path.join(workdir, "logs"))
    proc.start().wait_port(LOOPBACK, port)
    return proc, port


def start_worker(workdir, queue, profile=None):
    env = dict(os.environ)
    if profile:
        env["INGEST_PROFILE_FILE"] = profile
    worker = Worker(workdir, queue.address, cpu=SERVER_CPU, quiet=True, env=env)
    return worker.start()


def one_round(shape, args, workdir, queue):
    hello, hello_port = start_hello(workdir)
    try:
        base = measure(hello.pid, hello_port, shape, args, workdir)
    finally:
        hello.stop()
    worker = start_worker(workdir, queue)
    try:
        target = measure(worker.proc.pid, worker.port, shape, args, workdir)
    finally:
        worker.proc.stop()
    return base, target


def report_line(label, r):
    return ("%-6s %8.0f req/s %9.0f events/s  %6.1f us CPU/request  p50 %6.2f ms  p99 %6.2f ms"
            "  RSS %.0f MiB (peak %.0f)  non-2xx %d %s"
            % (label, r["rps"], r["events_per_s"], r["cpu_us_per_request"], r["p50_ms"] or 0,
               r["p99_ms"] or 0, r["rss_mib"], r["peak_rss_mib"], r["non_2xx"],
               r["socket_errors"]))


def profile_round(shape, args, workdir, queue):
    """One more round of the worker under cProfile (INGEST_PROFILE_FILE: the worker's profile_file setting)."""
    out = os.path.join(workdir, "worker.prof")
    worker = start_worker(workdir, queue, profile=out)
    try:
        measure(worker.proc.pid, worker.port, shape, args, workdir)
    finally:
        worker.proc.stop()
    import pstats
    import io
    text = io.StringIO()
    pstats.Stats(out, stream=text).sort_stats("tottime").print_stats(30)
    return text.getvalue()


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.wrk_bench",
                                description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="single,batch50")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=int, default=10)
    p.add_argument("--connections", type=int, default=100)
    p.add_argument("--out", default=None)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args(argv)
    if not shutil.which("wrk"):
        raise SystemExit("wrk_bench: wrk is not installed (apt-get install wrk)")
    workdir = args.out or tempfile.mkdtemp(prefix="wrk-bench-")
    os.makedirs(workdir, exist_ok=True)
    queue = QueueServer(workdir, sync_ms=100, cpu=LOAD_CPU, quiet=True).start()
    summary = {}
    try:
        for shape in args.shapes.split(","):
            ratios, cpu_ratios, rows = [], [], []
            for n in range(args.rounds):
                base, target = one_round(shape, args, workdir, queue)
                ratio = target["rps"] / base["rps"]
                cpu_ratio = base["cpu_us_per_request"] / target["cpu_us_per_request"]
                ratios.append(ratio)
                cpu_ratios.append(cpu_ratio)
                rows.append({"hello": base, "worker": target, "ratio": ratio})
                print("%s round %d" % (shape, n + 1))
                print("  " + report_line("hello", base))
                print("  " + report_line("worker", target))
                print("  ratio worker/hello %.3f (by CPU per request %.3f)" % (ratio, cpu_ratio))
                sys.stdout.flush()
            summary[shape] = {"rounds": rows, "median_ratio": statistics.median(ratios),
                              "median_cpu_ratio": statistics.median(cpu_ratios)}
            print("%s: median ratio worker/hello %.3f (CPU %.3f) over %d rounds"
                  % (shape, summary[shape]["median_ratio"], summary[shape]["median_cpu_ratio"],
                     args.rounds))
        if args.profile:
            text = profile_round(args.shapes.split(",")[0], args, workdir, queue)
            with open(os.path.join(workdir, "profile.txt"), "w") as fh:
                fh.write(text)
            print(text)
    finally:
        queue.proc.stop()
    with open(os.path.join(workdir, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    print("results under %s; load average %s" % (workdir, os.getloadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
