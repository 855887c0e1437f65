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

Further modes (each reported after the ratios):

    --together N  N rounds of the hello-world and the worker at the same time, both on
                  core 0, each under its own wrk on core 1.  This machine's speed drifts
                  within seconds (the hello-world alone took 97 to 179 us of CPU per
                  single GET on it), which the alternating rounds above see as noise in
                  their ratio; running both at once exposes them to the same drift.  The
                  ratios of requests/s and of CPU per request (from /proc) are both
                  reported.
    --open-loop   latency at 75% of each shape's capacity, paced: 50 wrk connections each
                  waiting a random delay before every request (closed-loop p99 at 100
                  connections is only connections / throughput), the delay shortened by
                  the answers' latency measured in a 3 s trial; the hello-world at the
                  same rate beside it.  --open-loop-rounds (3) rounds, each paced from a
                  capacity measured just before it (5 s closed loop), and their median;
                  each round prints the rate achieved as a share of that capacity
    --soak N      worker RSS after N events of batch50, and after --wide connections
                  (default 1000) of batch50 at once
    --nginx       the production tree (two workers, nginx, the queue; supervisord from
                  a temporary directory) through nginx and directly to one worker slot:
                  nothing pinned, so all of it shares the 2 cores with wrk

Every figure is followed by each core's steal meanwhile (from /proc/stat): the share
of its time the hypervisor gave to other machines, which makes this one slower.

It needs wrk (Debian package `wrk`); it only talks to 127.0.0.1 and stops every process
it started by pid.
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from bench import replay
from bench.cpu import cores_busy, steal_shares
from testkit.payloads import b64_json
from testkit.procs import (LOOPBACK, QueueServer, Worker, cpu_seconds, peak_rss_kib, pinned,
                           rss_kib)

SERVER_CPU, LOAD_CPU = 0, 1
TOKEN = "wrk-bench"
FORM = "application/x-www-form-urlencoded"      # the content type of batch50's body


def event(i):
    """A 9-property event like the Node SDK's."""
    return {"event": "Signed Up", "properties": {
        "token": TOKEN, "distinct_id": "user-%d" % i, "$insert_id": "ins%016d" % i,
        "time": int(time.time() * 1000), "mp_lib": "node", "$lib_version": "0.18.0",
        "plan": "premium", "amount": 12.5, "source": "landing-page"}}


def shape(name):
    """(path, form body or None for a GET, events per request)."""
    if name == "single":
        return "/track?ip=1&data=" + b64_json(event(1)), None, 1
    if name == "batch50":
        return "/track?ip=1", "data=" + b64_json([event(i) for i in range(50)]), 50
    raise SystemExit("unknown shape %r" % name)


def shape_request(name):
    """(path, wrk lua script or None, events per request)."""
    path, body, events = shape(name)
    script = None
    if body is not None:
        script = ('wrk.method = "POST"\nwrk.body = "%s"\n'
                  'wrk.headers["Content-Type"] = "%s"\n' % (body, FORM))
    return path, script, events


_LATENCY = re.compile(r"^\s+(50|99)(?:\.000)?%\s+([\d.]+)(us|ms|s)\s*$", re.M)
_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk_argv(port, path, script, duration, connections, workdir, name="request"):
    argv = ["wrk", "-t1", "-c%d" % connections, "-d%ds" % duration, "--latency"]
    if script:
        script_path = os.path.join(workdir, "%s.lua" % name)
        with open(script_path, "w") as fh:
            fh.write(script)
        argv += ["-s", script_path]
    argv.append("http://%s:%d%s" % (LOOPBACK, port, path))
    return pinned(LOAD_CPU, argv)


def wrk_result(out):
    """What wrk's report `out` says: requests, seconds, non-2xx, socket errors, p50/p99."""
    total = re.search(r"(\d+) requests in ([\d.]+)(s|m)", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    lat = {p: float(v) * _UNIT[u] for p, v, u in _LATENCY.findall(out)}
    return {"requests": int(total.group(1)), "seconds": float(total.group(2)),
            "non_2xx": int(bad.group(1)) if bad else 0,
            "socket_errors": errors.group(1) if errors else "",
            "p50_ms": lat.get("50"), "p99_ms": lat.get("99")}


def run_wrk(port, path, script, duration, connections, workdir):
    """wrk's result, and the share of each core the hypervisor took meanwhile (`steal`:
    this VM's speed moves with it)."""
    cores = cores_busy()
    out = subprocess.run(wrk_argv(port, path, script, duration, connections, workdir),
                         capture_output=True, text=True, timeout=duration + 30).stdout
    result = wrk_result(out)
    result["steal"] = steal_shares(cores, cores_busy())
    return result


def steal_text(r):
    """`steal 9%/19%` (each core's), or nothing where /proc/stat could not say."""
    steal = r.get("steal")
    if not steal:
        return ""
    return "  steal " + "/".join("%.0f%%" % (100 * v) for v in steal.values())


def run_wrks_at_once(ports, path, script, duration, connections, workdir):
    """One wrk against each of `ports`, all at the same time: their results, in order,
    each with the cores' steal meanwhile (see run_wrk)."""
    cores = cores_busy()
    runs = [subprocess.Popen(wrk_argv(port, path, script, duration, connections, workdir,
                                      "at-once-%d" % i), stdout=subprocess.PIPE, text=True)
            for i, port in enumerate(ports)]
    try:
        outs = [run.communicate(timeout=duration + 30)[0] for run in runs]
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
                run.wait()
    steal = steal_shares(cores, cores_busy())
    return [dict(wrk_result(out), steal=steal) for out in outs]


def measure(pid, port, shape, args, workdir, queue=None):
    """wrk against one server; `queue`: the bundled queue it writes to, whose share of
    core 1 (beside wrk) is reported too: a worker waiting on it is not CPU-bound."""
    path, script, events = shape_request(shape)
    run_wrk(port, path, script, 1, args.connections, workdir)       # warm up
    cpu0 = cpu_seconds(pid)
    qcpu0 = cpu_seconds(queue.proc.pid) if queue is not None else 0.0
    result = run_wrk(port, path, script, args.duration, args.connections, workdir)
    cpu = cpu_seconds(pid) - cpu0
    if queue is not None:
        result["queue_cpu_share"] = (cpu_seconds(queue.proc.pid) - qcpu0) / result["seconds"]
    result["cpu_share"] = cpu / result["seconds"]
    result["rps"] = result["requests"] / result["seconds"]
    result["events_per_s"] = result["rps"] * events
    result["cpu_us_per_request"] = cpu / max(result["requests"], 1) * 1e6
    result["rss_mib"] = rss_kib(pid) / 1024.0
    result["peak_rss_mib"] = peak_rss_kib(pid) / 1024.0
    return result



def start_hello(workdir):
    """bench.hello on core 0: (its Proc, its port)."""
    proc, url = replay.start_hello(SERVER_CPU, os.path.join(workdir, "logs"))
    return proc, int(url.rsplit(":", 1)[1])


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
        target = measure(worker.proc.pid, worker.port, shape, args, workdir, queue)
    finally:
        worker.proc.stop()
    return base, target


def together_round(shape, args, workdir, queue):
    """The hello-world and the worker at the same time, both on core 0, each under its
    own wrk on core 1: whatever the machine's speed does during the round, it does to
    both.  Returns (hello, worker) results like measure()'s (no RSS)."""
    path, script, events = shape_request(shape)
    hello, hello_port = start_hello(workdir)
    worker = start_worker(workdir, queue)
    try:
        servers = (("hello", hello.pid, hello_port), ("worker", worker.proc.pid, worker.port))
        for _name, _pid, port in servers:
            run_wrk(port, path, script, 1, args.connections, workdir)     # warm up
        cpu0 = [cpu_seconds(pid) for _name, pid, _port in servers]
        wrks = run_wrks_at_once([port for _name, _pid, port in servers], path, script,
                                args.duration, args.connections, workdir)
        results = []
        for (_name, pid, _port), r, start in zip(servers, wrks, cpu0):
            cpu = cpu_seconds(pid) - start
            r["rps"] = r["requests"] / r["seconds"]
            r["events_per_s"] = r["rps"] * events
            r["cpu_share"] = cpu / r["seconds"]
            r["cpu_us_per_request"] = cpu / max(r["requests"], 1) * 1e6
            results.append(r)
    finally:
        worker.proc.stop()
        hello.stop()
    return results


def together(args, workdir, queue, summary):
    """--together: rounds of together_round per shape, and the medians of their ratios."""
    for shape in args.shapes.split(","):
        ratios, cpu_ratios, rows = [], [], []
        for n in range(args.together):
            base, target = together_round(shape, args, workdir, queue)
            ratios.append(target["rps"] / base["rps"])
            cpu_ratios.append(base["cpu_us_per_request"] / target["cpu_us_per_request"])
            rows.append({"hello": base, "worker": target})
            print("%s together, round %d: hello %.0f req/s %.1f us CPU/request, worker %.0f"
                  " req/s %.0f events/s %.1f us CPU/request (%.0f events per CPU-second);"
                  " ratio %.3f (by CPU per request %.3f)%s"
                  % (shape, n + 1, base["rps"], base["cpu_us_per_request"], target["rps"],
                     target["events_per_s"], target["cpu_us_per_request"],
                     target["events_per_s"] / max(target["cpu_share"], 1e-9), ratios[-1],
                     cpu_ratios[-1], steal_text(target)))
            sys.stdout.flush()
        summary.setdefault(shape, {})["together"] = {
            "rounds": rows, "median_ratio": statistics.median(ratios),
            "median_cpu_ratio": statistics.median(cpu_ratios)}
        print("%s together: median ratio worker/hello %.3f (CPU %.3f) over %d rounds"
              % (shape, statistics.median(ratios), statistics.median(cpu_ratios), args.together))


def report_line(label, r):
    return ("%-6s %8.0f req/s %9.0f events/s  %6.1f us CPU/request  p50 %6.2f ms  p99 %6.2f ms"
            "  RSS %.0f MiB (peak %.0f)  non-2xx %d %s"
            % (label, r["rps"], r["events_per_s"], r["cpu_us_per_request"], r["p50_ms"] or 0,
               r["p99_ms"] or 0, r["rss_mib"], r["peak_rss_mib"], r["non_2xx"],
               r["socket_errors"])
            + "  core %.0f%%" % (100 * r["cpu_share"])
            + ("  queue %.0f%% of core 1" % (100 * r["queue_cpu_share"])
               if "queue_cpu_share" in r else "") + steal_text(r))


def profile_round(shape, args, workdir, queue):
    """One more round of the worker under cProfile (INGEST_PROFILE_FILE: the worker's
    profile_file setting)."""
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


OPEN_LOOP_CONNECTIONS = 50
# Seconds of closed-loop wrk that measure the capacity an open-loop round is paced from.
OPEN_LOOP_CAPACITY_S = 5
# Seconds of paced wrk that measure how long each connection's cycle takes beyond the
# delays asked for (mostly the answers' latency), before the round that is reported.
OPEN_LOOP_TRIAL_S = 3


def paced_script(script, mean_ms):
    """A wrk script whose every connection waits a random delay before each request,
    from 0 to twice `mean_ms` milliseconds, `mean_ms` on average: 50 connections offer a
    steady rate (delay_for takes the answers' latency off the delay), so the latency
    reported is near that of an open loop at that rate, not connections / throughput.
    It is still a loop: a connection waiting for a slow answer sends nothing meanwhile.
    Random, because connections that all waited the same delay would stay in step and
    arrive as bursts of 50.  wrk truncates a delay to whole milliseconds, so each is
    rounded up or down at random (a uniform 0..1 added before the floor), which keeps the
    mean asked for at `mean_ms`; rounding the mean itself asked a fast machine for 84 %
    of its capacity (a 4.48 ms mean rounded to 4) instead of 75 %."""
    return (script or "") + (
        "function delay()\n  return math.floor(math.random() * %.4f + math.random())\nend\n"
        % (2 * mean_ms))


def delay_for(rate, port, path, script, workdir):
    """The mean delay, in milliseconds, that brings OPEN_LOOP_CONNECTIONS to `rate`
    requests/s against the server on `port`.  A connection waits for each answer before
    its next delay, so delays of connections / rate alone offer less than `rate` (with
    the delays above, 9,300 single GETs/s arrived where 11,142 were asked for: a 1 ms
    answer beside a 4.5 ms delay).  A trial of OPEN_LOOP_TRIAL_S at that delay measures
    each connection's whole cycle, and the delay is shortened by what the cycle took
    beyond it (or lengthened, where wrk's timers fired early)."""
    mean_ms = OPEN_LOOP_CONNECTIONS * 1000.0 / rate
    result = run_wrk(port, path, paced_script(script, mean_ms), OPEN_LOOP_TRIAL_S,
                     OPEN_LOOP_CONNECTIONS, workdir)
    if not result["requests"] or result["non_2xx"] or result["socket_errors"]:
        raise SystemExit("open loop: the trial at %.0f req/s on port %d got %d answers, %d"
                         " not 2xx, socket errors %r; nothing to pace from"
                         % (rate, port, result["requests"], result["non_2xx"],
                            result["socket_errors"]))
    cycle_ms = OPEN_LOOP_CONNECTIONS * 1000.0 * result["seconds"] / result["requests"]
    return max(0.0, 2 * mean_ms - cycle_ms)


def open_loop(shape, capacity, args, workdir, queue):
    """p50/p99 at 75% of `capacity` requests/s, paced (see paced_script), for the worker
    and, at the same rate, for the hello-world; each server's share of its core too."""
    path, script, _events = shape_request(shape)
    rate = 0.75 * capacity
    out = {"rate": rate, "capacity": capacity}
    for name in ("hello", "worker"):
        if name == "hello":
            proc, port = start_hello(workdir)
        else:
            worker = start_worker(workdir, queue)
            proc, port = worker.proc, worker.port
        try:
            paced = paced_script(script, delay_for(rate, port, path, script, workdir))
            cpu0 = cpu_seconds(proc.pid)
            r = run_wrk(port, path, paced, args.duration, OPEN_LOOP_CONNECTIONS, workdir)
            cpu_share = (cpu_seconds(proc.pid) - cpu0) / r["seconds"]
        finally:
            proc.stop()
        out[name] = {"achieved": r["requests"] / r["seconds"], "p50_ms": r["p50_ms"],
                     "p99_ms": r["p99_ms"], "cpu_share": cpu_share, "steal": r["steal"]}
    return out


def capacity_now(shape, args, workdir, queue):
    """The worker's closed-loop requests/s for shape, measured now (OPEN_LOOP_CAPACITY_S
    of wrk at --connections): this VM's speed moves within minutes, so a capacity from
    the ratio rounds may no longer be the machine's when the open loop runs."""
    worker = start_worker(workdir, queue)
    try:
        short = argparse.Namespace(**dict(vars(args), duration=OPEN_LOOP_CAPACITY_S))
        return measure(worker.proc.pid, worker.port, shape, short, workdir, queue)["rps"]
    finally:
        worker.proc.stop()


def open_loop_rounds(shape, args, workdir, queue):
    """--open-loop: --open-loop-rounds of capacity_now then open_loop; their rounds and
    the median p50/p99 of each server."""
    rounds = []
    for n in range(args.open_loop_rounds):
        result = open_loop(shape, capacity_now(shape, args, workdir, queue), args, workdir,
                           queue)
        rounds.append(result)
        for name in ("hello", "worker"):
            r = result[name]
            print("%s open loop, round %d: paced at %.0f req/s (75%% of %.0f), %s: achieved"
                  " %.0f (%.0f%% of capacity), p50 %.2f ms, p99 %.2f ms, %.0f%% of its core"
                  " (%.0f us per request)%s"
                  % (shape, n + 1, result["rate"], result["capacity"], name, r["achieved"],
                     100 * r["achieved"] / result["capacity"],
                     r["p50_ms"], r["p99_ms"], 100 * r["cpu_share"],
                     1e6 * r["cpu_share"] / max(r["achieved"], 1), steal_text(r)), flush=True)
    summary = {"rounds": rounds}
    for name in ("hello", "worker"):
        summary[name] = {key: statistics.median(r[name][key] for r in rounds)
                         for key in ("p50_ms", "p99_ms")}
    print("%s open loop: median p99 worker %.2f ms, hello-world %.2f ms over %d rounds"
          % (shape, summary["worker"]["p99_ms"], summary["hello"]["p99_ms"], len(rounds)))
    return summary


def soak(args, workdir, queue):
    """Worker RSS after args.soak events of batch50, then after args.wide connections."""
    worker = start_worker(workdir, queue)
    try:
        path, script, events = shape_request("batch50")
        sent = 0
        while sent < args.soak:
            r = run_wrk(worker.port, path, script, 10, 100, workdir)
            sent += r["requests"] * events
        steady = rss_kib(worker.proc.pid) / 1024.0
        wide = run_wrk(worker.port, path, script, 10, args.wide, workdir)
        after = rss_kib(worker.proc.pid) / 1024.0
        peak = peak_rss_kib(worker.proc.pid) / 1024.0
        time.sleep(3.0)     # a measurement interval: what an idle worker gives back
        settled = rss_kib(worker.proc.pid) / 1024.0
    finally:
        worker.proc.stop()
    return {"events": sent, "rss_after_events_mib": steady, "wide_connections": args.wide,
            "wide_rps": wide["requests"] / wide["seconds"], "wide_non_2xx": wide["non_2xx"],
            "rss_after_wide_mib": after, "rss_3s_later_mib": settled, "peak_rss_mib": peak}


def through_nginx(args, workdir):
    """events/s and p99 through nginx in front of two workers, and directly to one."""
    from testkit.tree import Tree
    tree = Tree(os.path.join(workdir, "tree"), workers=2).start()
    out = {}
    try:
        for shape in args.shapes.split(","):
            path, script, events = shape_request(shape)
            for where, port in (("nginx", tree.http_port), ("direct", tree.worker_port(0))):
                run_wrk(port, path, script, 1, args.connections, workdir)
                r = run_wrk(port, path, script, args.duration, args.connections, workdir)
                r["events_per_s"] = r["requests"] / r["seconds"] * events
                out["%s/%s" % (shape, where)] = r
    finally:
        tree.stop()
        tree.cleanup()
    return out


def extra_modes(args, workdir, queue, summary):
    if args.together:
        together(args, workdir, queue, summary)
    if args.open_loop:
        for shape in args.shapes.split(","):
            summary.setdefault(shape, {})["open_loop"] = open_loop_rounds(shape, args, workdir,
                                                                          queue)
    if args.soak:
        summary["soak"] = r = soak(args, workdir, queue)
        print("soak: RSS %.1f MiB after %d events; %.1f MiB after %d connections (%.0f req/s,"
              " non-2xx %d), %.1f MiB 3 s later; peak %.1f MiB"
              % (r["rss_after_events_mib"], r["events"], r["rss_after_wide_mib"],
                 r["wide_connections"], r["wide_rps"], r["wide_non_2xx"], r["rss_3s_later_mib"],
                 r["peak_rss_mib"]))
    if args.nginx:
        summary["nginx"] = result = through_nginx(args, workdir)
        for name, r in result.items():
            print("%-16s %8.0f req/s %9.0f events/s  p50 %6.2f ms  p99 %6.2f ms  non-2xx %d"
                  % (name, r["requests"] / r["seconds"], r["events_per_s"], r["p50_ms"] or 0,
                     r["p99_ms"] or 0, r["non_2xx"]))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.wrk_bench",
                                description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="single,batch50")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=int, default=10)
    p.add_argument("--connections", type=int, default=100)
    p.add_argument("--out", default=None)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--together", type=int, default=0, metavar="ROUNDS",
                   help="also ROUNDS rounds of the hello-world and the worker at once")
    p.add_argument("--open-loop", action="store_true")
    p.add_argument("--open-loop-rounds", type=int, default=3,
                   help="open-loop rounds per shape, each after its own capacity reading")
    p.add_argument("--soak", type=int, default=0, help="events of batch50 before the RSS reading")
    p.add_argument("--wide", type=int, default=1000, help="connections for the wide RSS reading")
    p.add_argument("--nginx", action="store_true")
    p.add_argument("--skip-ratios", action="store_true", help="only the extra modes")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.open_loop_rounds < 1:
        p.error("--rounds and --open-loop-rounds must be at least 1")
    if not shutil.which("wrk"):
        raise SystemExit("wrk_bench: wrk is not installed (apt-get install wrk)")
    workdir = args.out or tempfile.mkdtemp(prefix="wrk-bench-")
    os.makedirs(workdir, exist_ok=True)
    queue = QueueServer(workdir, sync_ms=100, cpu=LOAD_CPU, quiet=True).start()
    summary = {}
    try:
        for shape in ([] if args.skip_ratios else args.shapes.split(",")):
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
        extra_modes(args, workdir, queue, summary)
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
