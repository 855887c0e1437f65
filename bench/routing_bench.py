"""Microbenchmark of ingest.routing: ns per routing decision, and the cost of loading.

    .venv/bin/python -m bench.routing_bench [--lookups N] [--sizes 10,10000,1000000]
                                            [--load-tokens 10000,1000000] [--json]

Part 1: ns per `table.route(endpoint, token, now)` with 10, 10,000 and 1,000,000 tokens
in the table, for records whose tokens are drawn at random from the table (90%:
uniformly, or Zipf-like as real traffic is) or are unknown (10%), with and without
"overflow" configured.  Figures are the best of a few
repeats, with the cost of an empty Python call through the same loop subtracted (and
printed, so the raw figure can be rebuilt).

Part 2: time and memory to load a routes file of 10,000 and 1,000,000 tokens, generated
in a temp directory.  Each load runs in a fresh child process, so the peak-RSS figure (VmHWM minus
RSS before the load) is the load's own; a second child repeats it under tracemalloc for
the Python-heap peak and what the table keeps.

Pure CPU and a temp file: no sockets.  Bounded: about a minute on a 2-core box.
"""
import argparse
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from ingest import routing  # noqa: E402
from testkit.payloads import write_routes  # noqa: E402

ENDPOINT_WEIGHTS = (("track", 80), ("engage", 15), ("groups", 3), ("import", 2))
UNKNOWN_SHARE = 0.10
REPEATS = 7


def make_tokens(n, rng):
    """n distinct 32-hex-character tokens (the shape of Mixpanel project tokens)."""
    tokens = set()
    while len(tokens) < n:
        tokens.add("%032x" % rng.getrandbits(128))
    return list(tokens)


def routes_dict(tokens, overflow):
    """Half the tokens override /track (64 shard queues), a quarter also /engage."""
    entries = {}
    for i, tok in enumerate(tokens):
        if i % 2 == 0:
            entry = {"track": "events_%02d" % (i % 64)}
            if i % 4 == 0:
                entry["engage"] = "people_%02d" % (i % 64)
        else:
            entry = {}
        entries[tok] = entry
    data = {"tokens": entries,
            "blocked_tokens": tokens[1::1000],
            "secrets": {t: "secret-%d" % i for i, t in enumerate(tokens[3::1000])}}
    if overflow:
        data["overflow"] = {"events_per_second": 1000, "burst": 2000}
    return data


def make_lookups(tokens, count, rng, distribution):
    """(endpoint, token, now) triples; `now` advances 1 us a record (1M records/s).

    Each token is a fresh string object, as the decoder would produce, so the table's
    dict has to compare characters, not just identities.  "uniform": every table token
    equally likely (the worst case for CPU caches); "zipf": token of rank r drawn with
    weight 1/r (a few customers send most events, as in real traffic).
    """
    endpoints = [ep for ep, w in ENDPOINT_WEIGHTS for _ in range(w)]
    unknown = make_tokens(max(1, count // 50), rng)
    known_count = count - int(count * UNKNOWN_SHARE)
    if distribution == "zipf":
        cum, total = [], 0.0
        for rank in range(1, len(tokens) + 1):
            total += 1.0 / rank
            cum.append(total)
        picks = rng.choices(tokens, cum_weights=cum, k=known_count)
    else:
        picks = [rng.choice(tokens) for _ in range(known_count)]
    picks += [rng.choice(unknown) for _ in range(count - known_count)]
    rng.shuffle(picks)
    out = []
    now = 1000.0
    for tok in picks:
        out.append((rng.choice(endpoints), (tok + " ")[:-1], now))
        now += 1e-6
    return out


def _noop(endpoint, token, now):
    return None


def time_loop(fn, lookups):
    best = float("inf")
    for _ in range(REPEATS):
        gc.disable()
        t0 = time.perf_counter_ns()
        for ep, tok, now in lookups:
            fn(ep, tok, now)
        elapsed = time.perf_counter_ns() - t0
        gc.enable()
        best = min(best, elapsed)
    return best / len(lookups)


def bench_route(sizes, count, rng):
    rows = []
    for n in sizes:
        tokens = make_tokens(n, rng)
        tables = {overflow: routing.RoutingTable.from_dict(routes_dict(tokens, overflow))
                  for overflow in (False, True)}
        for distribution in ("uniform", "zipf"):
            lookups = make_lookups(tokens, count, rng, distribution)
            base = time_loop(_noop, lookups)
            for overflow, table in tables.items():
                before = sum(table.overflowed.values())
                ns = time_loop(table.route, lookups)
                decided = len(lookups) * REPEATS
                spilled = sum(table.overflowed.values()) - before
                rows.append({"tokens": n, "tokens_drawn": distribution, "overflow": overflow,
                             "ns_per_route": round(ns - base, 1), "ns_raw": round(ns, 1),
                             "ns_loop": round(base, 1),
                             "overflowed_share": round(spilled / decided, 3)})
            del lookups
        del tokens, tables
        gc.collect()
    return rows


def write_routes_file(path, n, rng):
    write_routes(path, routes_dict(make_tokens(n, rng), overflow=True), compact=True)
    return os.path.getsize(path)


def _rss_kib(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def child_load(path, mode):
    """Runs in a fresh process: load `path` once and print figures as JSON."""
    gc.collect()
    if mode == "tracemalloc":
        import tracemalloc
        tracemalloc.start()
        t0 = time.perf_counter()
        table = routing.RoutingTable.from_file(path)
        seconds = time.perf_counter() - t0
        gc.collect()
        current, peak = tracemalloc.get_traced_memory()
        out = {"heap_peak_mb": peak / 2**20, "heap_kept_mb": current / 2**20}
    else:
        before = _rss_kib("VmRSS")
        t0 = time.perf_counter()
        table = routing.RoutingTable.from_file(path)
        seconds = time.perf_counter() - t0
        gc.collect()
        out = {"rss_peak_delta_mb": (_rss_kib("VmHWM") - before) / 1024,
               "rss_kept_delta_mb": (_rss_kib("VmRSS") - before) / 1024}
    out.update(seconds=seconds, tokens=len(table))
    print(json.dumps(out))


def run_child(path, mode):
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child-load", path,
                           "--child-mode", mode], capture_output=True, text=True,
                          timeout=120, check=True)
    return json.loads(proc.stdout)


def bench_load(n, rng):
    with tempfile.TemporaryDirectory(prefix="routing-bench-") as tmp:
        path = os.path.join(tmp, "routes.json")
        size = write_routes_file(path, n, rng)
        rss = run_child(path, "rss")
        heap = run_child(path, "tracemalloc")
    return {"tokens": n, "file_mb": round(size / 2**20, 1),
            "load_s": round(rss["seconds"], 3),
            "rss_peak_delta_mb": round(rss["rss_peak_delta_mb"], 1),
            "rss_kept_delta_mb": round(rss["rss_kept_delta_mb"], 1),
            "heap_peak_mb": round(heap["heap_peak_mb"], 1),
            "heap_kept_mb": round(heap["heap_kept_mb"], 1),
            "load_s_under_tracemalloc": round(heap["seconds"], 2)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lookups", type=int, default=200_000, help="routing decisions per case")
    p.add_argument("--sizes", default="10,10000,1000000", help="table sizes in tokens")
    p.add_argument("--load-tokens", default="10000,1000000",
                   help="tokens in the generated files for the load test ('' = skip)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument("--child-load", help=argparse.SUPPRESS)
    p.add_argument("--child-mode", default="rss", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_load:
        return child_load(args.child_load, args.child_mode)
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    route_rows = bench_route(sizes, args.lookups, rng)
    load = [bench_load(int(n), rng) for n in args.load_tokens.split(",") if int(n or 0)]
    result = {"python": sys.version.split()[0], "route": route_rows, "load": load,
              "bench_seconds": round(time.perf_counter() - t0, 1)}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        report(result)
    return 0


def report(result):
    print("routing decision, ns per record (loop overhead subtracted), python %s"
          % result["python"])
    print("%10s  %-7s  %-8s  %8s  %8s  %8s  %10s" % (
        "tokens", "drawn", "overflow", "ns/route", "raw", "loop", "overflowed"))
    for r in result["route"]:
        print("%10d  %-7s  %-8s  %8.1f  %8.1f  %8.1f  %9.1f%%" % (
            r["tokens"], r["tokens_drawn"], "yes" if r["overflow"] else "no",
            r["ns_per_route"], r["ns_raw"], r["ns_loop"], 100 * r["overflowed_share"]))
    for load in result["load"]:
        print("load %(tokens)d-token file (%(file_mb).1f MB): %(load_s).3f s, peak RSS"
              " +%(rss_peak_delta_mb).1f MB, kept RSS +%(rss_kept_delta_mb).1f MB;"
              " tracemalloc heap peak %(heap_peak_mb).1f MB, kept %(heap_kept_mb).1f MB"
              % load)
    print("bench took %.1f s" % result["bench_seconds"])


if __name__ == "__main__":
    sys.exit(main())
