"""Microbenchmarks: what each request costs inside the worker, without HTTP.

    python -m bench.micro [--log FILE] [--requests N] [--seconds S]
                          [--parts app,stages,routing,kestrel,queue] [--json FILE]

Parts:
  app      the whole WSGI pipeline in-process: `make_app(settings, MemorySink(), clock)`
           called with environ dicts built from access-log entries; microseconds per
           request and per record stored (decode + clean + route + sink.put into memory +
           response), and the same loop around a bare hello-world WSGI app, whose cost is
           the harness's own.
  stages   per-stage decode / clean / route timings (see the marked section below).
  routing  runs bench/routing_bench.py (owned by the routing engineer).
  kestrel  runs bench/kestrel_client_bench.py (the Kestrel client's add_many) if present.
  queue    runs bench/queue_server_bench.py (the bundled queue's sets/s) if present.
Default: app,stages.  The scripts behind routing/kestrel/queue start their own processes
and take up to a minute each; their output is passed through unchanged.

CPU only for app and stages: no sockets, no eventlet.  It must not be used to judge
eventlet's share of a request: only the replay against a real worker does that.
"""
import argparse
import io
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXED_NOW = 1795660000.0  # a fixed clock, so event-time checks do not depend on the day
EXTERNAL = {"routing": "bench/routing_bench.py", "kestrel": "bench/kestrel_client_bench.py",
            "queue": "bench/queue_server_bench.py"}


# ==== environ from log entries ===========================================================

def environ_template(entry):
    """A WSGI environ for one log entry (bench.capture.Entry)."""
    method, uri, content_type, body, client = entry[:5]
    body = body or b""
    path, _, query = uri.partition(b"?")
    env = {
        "REQUEST_METHOD": method, "SCRIPT_NAME": "",
        # PEP 3333: PATH_INFO is the URL-decoded path as latin-1 str.
        "PATH_INFO": _unquote_latin1(path), "QUERY_STRING": query.decode("latin-1"),
        "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8000", "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": "40000",
        "HTTP_HOST": "127.0.0.1:8000", "HTTP_USER_AGENT": "ingest-bench/1",
        "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.errors": sys.stderr,
        "wsgi.multithread": False, "wsgi.multiprocess": False, "wsgi.run_once": False,
    }
    if client:
        env["HTTP_X_FORWARDED_FOR"] = client
    if content_type:
        env["CONTENT_TYPE"] = content_type.decode("latin-1")
    if body or method == "POST":
        env["CONTENT_LENGTH"] = str(len(body))
    return env, body


def _unquote_latin1(path):
    import urllib.parse
    return urllib.parse.unquote_to_bytes(path).decode("latin-1")


def _start_response(status, headers, exc_info=None):
    return None


def time_app(app, cases, seconds, sink=None):
    """Call `app` over the cases repeatedly for about `seconds`; returns figures."""
    calls = 0
    stored = 0
    elapsed = 0.0
    while elapsed < seconds:
        if sink is not None:
            sink.items.clear()  # keep memory flat; counted before clearing
        t = time.perf_counter()
        for env, body in cases:
            environ = dict(env)
            environ["wsgi.input"] = io.BytesIO(body)
            for _chunk in app(environ, _start_response):
                pass
        elapsed += time.perf_counter() - t
        calls += len(cases)
        if sink is not None:
            stored += len(sink.items)
    return {"requests": calls, "seconds": round(elapsed, 3),
            "us_per_request": round(elapsed / calls * 1e6, 2),
            "records_stored": stored,
            "us_per_record": round(elapsed / stored * 1e6, 2) if stored else None}


def bench_app(entries, seconds):
    from bench.hello import app as hello_app
    from ingest import config
    from ingest.http import make_app
    from ingest.sinks.memory import MemorySink
    import logging
    logging.disable(logging.WARNING)  # the ~1% malformed requests log a warning each
    cases = [environ_template(e) for e in entries]
    sink = MemorySink()
    app = make_app(config.resolve({}, environ={}), sink, lambda: FIXED_NOW)
    harness = time_app(hello_app, cases, min(seconds, 1.0))
    pipeline = time_app(app, cases, seconds, sink)
    pipeline["harness_us_per_request"] = harness["us_per_request"]
    pipeline["net_us_per_request"] = round(pipeline["us_per_request"] - harness["us_per_request"], 2)
    return pipeline


def json_text(data):
    """The JSON text inside a `data` value (base64 undone), or None when it is not.
    `data`: as decode.read_params gives it, a str or an ASCII body's bytes."""
    from ingest import decode
    from ingest.errors import IngestError
    if isinstance(data, bytes):
        data = data.decode("ascii")
    if data.lstrip()[:1] in ("{", "["):
        return data
    try:
        return decode.b64decode(data).decode("utf-8")
    except (IngestError, UnicodeDecodeError):
        return None


# ==== per-stage timings ==================================================================
# >>> PER-STAGE TIMINGS: decode / clean / route, per record and per request. <<<
# Each stage runs over the whole log's worth of inputs, prepared by the stage before it
# outside the timed loop: params (query + body -> parameters), decode (`data` -> records),
# clean (per record, on freshly decoded records since cleaning mutates them), route
# (per record, the default table), encode (cleaned record -> the queue item's bytes).
def bench_stages(entries, seconds):
    from ingest import clean as cleaning, decode, routing
    from ingest.encode import _exact, encode_record
    from ingest.errors import IngestError, RecordRejected
    inputs = []
    for env, body in (environ_template(e) for e in entries):
        endpoint = env["PATH_INFO"].rstrip("/").rsplit("/", 1)[-1]
        if endpoint in ("track", "engage", "groups"):
            inputs.append((endpoint, env.get("QUERY_STRING", ""), env.get("CONTENT_TYPE", ""), body))
    table = routing.default_table()
    budget = max(seconds / 5.0, 0.2)

    def timed(func, items):
        """Seconds per item of func over items, repeated for about `budget` seconds."""
        n, elapsed = 0, 0.0
        while elapsed < budget:
            t = time.perf_counter()
            for item in items:
                func(item)
            elapsed += time.perf_counter() - t
            n += len(items)
        return elapsed / n

    def params(item):
        try:
            return decode.read_params(item[1], item[2], item[3])
        except IngestError:
            return {}

    datas = [(item[0], params(item).get("data")) for item in inputs]
    datas = [(ep, d) for ep, d in datas if d]

    def decoded(item):
        try:
            return decode.decode_records(item[1])[:2]
        except IngestError:
            return [], False

    def fresh_records(with_plain=False):
        out = []
        for ep, d in datas:
            recs, plain = decoded((ep, d))
            out += [(ep, rec, plain) if with_plain else (ep, rec) for rec in recs]
        return out

    ctx = cleaning.Context(FIXED_NOW, "203.0.113.9")
    cleaners = {ep: cleaning.cleaner(ep) for ep in ("track", "engage", "groups")}

    def clean_one(item):
        try:
            return cleaners[item[0]](item[1], ctx)
        except RecordRejected:
            return None

    records = fresh_records()
    params_s = timed(params, inputs)
    decode_s = timed(decoded, datas)
    n_clean, clean_total = 0, 0.0
    while clean_total < budget:          # cleaning mutates: new records every pass
        batch = fresh_records()
        t = time.perf_counter()
        for item in batch:
            clean_one(item)
        clean_total += time.perf_counter() - t
        n_clean += len(batch)
    tokens = [(ep, clean_one((ep, rec))) for ep, rec in records]
    tokens = [(ep, tok) for ep, tok in tokens if tok]
    route_s = timed(lambda item: table.route(item[0], item[1], FIXED_NOW), tokens)
    # (cleaning mutates in place: `records` above were cleaned by the route stage's setup)
    cleaned = [(rec, plain) for (ep, rec), (_, _, plain) in
               zip(records, fresh_records(with_plain=True)) if isinstance(rec, dict)]
    encode_s = timed(lambda item: encode_record(item[0], 1 << 30, item[1]), cleaned)
    encode_exact_s = timed(lambda item: _exact(item[0]), cleaned)
    plain_share = sum(1 for _, plain in cleaned if plain) / max(len(cleaned), 1)
    texts = [json_text(d) for _, d in datas]
    texts = [t for t in texts if t is not None]

    def quiet(loads):
        def run(text):
            try:
                return loads(text)
            except IngestError:
                return None
        return run

    json_s = timed(quiet(decode.loads), texts)
    json_exact_s = timed(quiet(decode.strict_loads), texts)
    per_request = len(records) / max(len(datas), 1)
    return {"requests": len(datas), "records": len(records),
            "records_per_request": round(per_request, 2),
            "params_us_per_request": round(params_s * 1e6, 2),
            "decode_us_per_request": round(decode_s * 1e6, 2),
            "decode_us_per_record": round(decode_s * 1e6 / per_request, 2),
            "clean_us_per_record": round(clean_total / n_clean * 1e6, 2),
            "route_us_per_record": round(route_s * 1e6, 3),
            "encode_us_per_record": round(encode_s * 1e6, 2),
            # the JSON fast paths against the exact (reference) paths, in the same run
            "encode_exact_us_per_record": round(encode_exact_s * 1e6, 2),
            "records_on_fast_json_path": round(plain_share, 3),
            "json_decode_us_per_record": round(json_s * 1e6 / per_request, 2),
            "json_decode_exact_us_per_record": round(json_exact_s * 1e6 / per_request, 2)}
# >>> END PER-STAGE TIMINGS <<<


# ==== the other engineers' scripts =======================================================

def run_external(name):
    path = os.path.join(ROOT, EXTERNAL[name])
    if not os.path.exists(path):
        return {"skipped": "%s does not exist" % EXTERNAL[name]}
    print("\n== %s: %s ==" % (name, EXTERNAL[name]), flush=True)
    res = subprocess.run([sys.executable, path], cwd=ROOT, timeout=600)
    return {"script": EXTERNAL[name], "returncode": res.returncode}


# ==== command line =======================================================================

def load_entries(log, requests, seed):
    from bench import make_log, replay
    if log is None:
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            log = os.path.join(tmp, "micro.log")
            make_log.generate(log, requests, seed=seed, start_time=FIXED_NOW - 60)
            return replay.load_log(log)[0]
    return replay.load_log(log)[0][:requests]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.micro", description=__doc__.splitlines()[0])
    p.add_argument("--log", default=None, help="access log (default: a generated one)")
    p.add_argument("--requests", type=int, default=2000, help="log entries to cycle through")
    p.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--parts", default="app,stages",
                   help="comma-separated: app,stages,routing,kestrel,queue")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = set(parts) - {"app", "stages"} - set(EXTERNAL)
    if unknown:
        p.error("unknown parts: %s" % ", ".join(sorted(unknown)))
    results = {}
    entries = load_entries(args.log, args.requests, args.seed) if {"app", "stages"} & set(parts) else []
    if "app" in parts:
        results["app"] = r = bench_app(entries, args.seconds)
        print("app pipeline (in-process, MemorySink): %.1f us/request, %s us/record stored "
              "(%d requests, %d records); harness alone %.2f us/request"
              % (r["us_per_request"], r["us_per_record"], r["requests"], r["records_stored"],
                 r["harness_us_per_request"]), flush=True)
    if "stages" in parts:
        results["stages"] = bench_stages(entries, args.seconds)
        print("stages: %s" % json.dumps(results["stages"]), flush=True)
    for name in EXTERNAL:
        if name in parts:
            results[name] = run_external(name)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
