"""Instructions per request of the worker's app pipeline, counted by valgrind: a figure
that does not move with the machine's load, for judging a change to the hot path.

    python -m bench.instructions [--shapes single,batch50] [--kestrel] [--requests 200]

wrk_bench's rates vary by 10-20 % between runs on a shared VM, more than most single
changes save; the number of instructions a request executes does not.  For each shape
(wrk_bench's: a one-event GET, a 50-event form POST) this runs the in-process pipeline
(`make_app` called with an environ, as bench.micro does, the worker's garbage-collector
settings applied) under `valgrind --tool=callgrind` twice, for a few and for
`--requests` more requests, and prints the difference per request: start-up cancels out.
User-space instructions only: no HTTP parsing, no kernel, no eventlet hub.

`--kestrel`: the records go to a bundled queue (started on a free loopback port, stopped
at the end) through the Kestrel client instead of a MemorySink, so the client's share is
counted too.  Needs valgrind (Debian package `valgrind`); about 20 s per shape.
"""
import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WARM_REQUESTS = 50


def pipeline(shape, kestrel_address=None, worker_gc=True):
    """A function that runs one request of `shape` through the app pipeline; `worker_gc`:
    apply the worker's garbage-collector settings to this process."""
    import gc

    from bench import wrk_bench
    from ingest import config
    from ingest.http import make_app
    from ingest.sinks.memory import MemorySink
    path, form, _events = wrk_bench.shape(shape)
    target, _, query = path.partition("?")
    body = form.encode() if form is not None else b""
    env = {"REQUEST_METHOD": "POST" if body else "GET", "SCRIPT_NAME": "", "PATH_INFO": target,
           "QUERY_STRING": query, "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8000",
           "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1", "REMOTE_PORT": "40000",
           "HTTP_HOST": "127.0.0.1:8000", "wsgi.version": (1, 0), "wsgi.url_scheme": "http",
           "wsgi.errors": sys.stderr}
    if body:
        env["CONTENT_TYPE"] = "application/x-www-form-urlencoded"
        env["CONTENT_LENGTH"] = str(len(body))
    if kestrel_address:
        from ingest.kestrel.client import Client
        from ingest.sinks.kestrel import KestrelSink
        sink = KestrelSink(Client([kestrel_address]))
    else:
        sink = MemorySink()
    app = make_app(config.resolve({}, environ={}), sink, time.time)
    if worker_gc:
        # The worker's settings (ingest/worker.py): start-up objects frozen, young
        # collections every 50,000 allocations.
        gc.collect()
        gc.freeze()
        gc.set_threshold(50000, 20, 20)

    def start_response(status, headers, exc_info=None):
        if not status.startswith("200"):
            raise SystemExit("the pipeline answered %s" % status)

    def one():
        environ = dict(env)
        environ["wsgi.input"] = io.BytesIO(body)
        for _chunk in app(environ, start_response):
            pass
        if not kestrel_address:
            sink.items.clear()
    return one


def _child(argv):
    """Inside valgrind: run `count` requests of `shape`."""
    shape, count, address = argv[0], int(argv[1]), argv[2] if len(argv) > 2 else None
    one = pipeline(shape, address)
    for _ in range(count):
        one()


def _instructions(shape, count, address):
    argv = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
            sys.executable, "-m", "bench.instructions", "--child", shape, str(count)]
    if address:
        argv.append(address)
    # A fixed hash seed: with a random one, dict and set layouts (and so the count) move
    # by about 1% from run to run.
    env = dict(os.environ, PYTHONHASHSEED="0")
    out = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    for line in out.stderr.splitlines():
        if "Collected :" in line:
            return int(line.rsplit(":", 1)[1])
    raise SystemExit("valgrind gave no count:\n" + out.stderr[-2000:])


def per_request(shape, requests, address=None):
    few = _instructions(shape, WARM_REQUESTS, address)
    many = _instructions(shape, WARM_REQUESTS + requests, address)
    return (many - few) / float(requests)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return _child(argv[1:])
    p = argparse.ArgumentParser(prog="python -m bench.instructions",
                                description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="single,batch50")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--kestrel", action="store_true",
                   help="through the Kestrel client to a bundled queue, not a MemorySink")
    args = p.parse_args(argv)
    if shutil.which("valgrind") is None:
        raise SystemExit("bench.instructions needs valgrind (apt-get install valgrind)")
    from bench.wrk_bench import shape as shape_of
    queue, workdir = None, tempfile.mkdtemp(prefix="instructions-")
    try:
        if args.kestrel:
            from testkit.procs import QueueServer
            queue = QueueServer(workdir, sync_ms=100, quiet=True).start()
        for shape in args.shapes.split(","):
            n = per_request(shape, args.requests, queue.address if queue else None)
            events = shape_of(shape)[2]
            print("%-8s %10.0f instructions per request, %8.0f per event%s"
                  % (shape, n, n / events, " (Kestrel client to a bundled queue)" if queue else ""),
                  flush=True)
    finally:
        if queue is not None:
            queue.proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
