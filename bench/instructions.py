"""Instructions per request of the worker's app pipeline, counted by valgrind: a figure
that does not move with the machine's load, for judging a change to the hot path.

    python -m bench.instructions [--shapes single,batch50,mixed] [--kestrel] [--requests 200]
    python -m bench.instructions --processes [--shapes single,batch50,mixed] [--requests 200]
    python -m bench.instructions --seam [--shapes single,batch50] [--requests 200]
    python -m bench.instructions --queue [--requests 200]

wrk_bench's rates vary by 10-20 % between runs on a shared VM, more than most single
changes save; the number of instructions a request executes does not.  For each shape
(wrk_bench's: a one-event GET, a 50-event form POST) this runs the in-process pipeline
(`make_app` called with an environ, as bench.micro does, the worker's garbage-collector
settings applied) under `valgrind --tool=callgrind` twice, for a few and for
`--requests` more requests, and prints the difference per request: start-up cancels out.
User-space instructions only: no HTTP parsing, no kernel, no eventlet hub.  The `mixed`
shape is 400 requests of the log `make bench` replays (bench.make_log, seed 1; in
process the clock is fixed near its event times), counted over two passes.

`--kestrel`: the records go to a bundled queue (started on a free loopback port, stopped
at the end) through the Kestrel client instead of a MemorySink, so the client's share is
counted too.  Needs valgrind (Debian package `valgrind`); about 20 s per shape.

Two whole-process modes, each about a minute per shape:

`--processes`: the whole `ingest serve` process (HTTP parsing, eventlet, the app, the
Kestrel client writing to a bundled queue) and, beside it, the bare hello-world
(bench.hello), each under callgrind, sent the shape's requests one after another on one
keep-alive connection.  Under wrk's load the worker's Kestrel writes carry many
requests each; here every request makes its own, so the worker's count is an upper bound.
The processes' timers keep running while valgrind slows them: repeat runs differ by a
few per cent.

`--seam`: the worker's HTTP seam in process (IngestProtocol and the app with a
MemorySink, wsgi_exchange's environ and answer, eventlet's server object) against the
bare hello-world on eventlet's own HttpProtocol, each fed the shape's requests pipelined
on one socketpair written before the first is read: nothing ever waits, so the count is
exact, but the hub's waits and wake-ups (and the Kestrel client) are not in it.  About
a minute per shape.

`--queue`: the bundled `ingest queue` under callgrind, sent batches of 50 `set`s of the
batch shape's cleaned event (what a worker writes), one batch at a time: instructions
per set.
"""
import argparse
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WARM_REQUESTS = 50


# The `mixed` shape: this many requests of a log bench.make_log generates (fixed seed),
# each pass over them counted as MIXED_REQUESTS requests.
MIXED_REQUESTS = 400


def pipeline(shape, kestrel_address=None, worker_gc=True, answers=None):
    """A function that runs one request of `shape` (of `mixed`: one pass over the log's
    MIXED_REQUESTS) through the app pipeline; `worker_gc`: apply the worker's
    garbage-collector settings to this process; `answers`: a list each answer's (status
    line, body) is appended to."""
    import gc

    from bench.micro import FIXED_NOW, environ_template, load_entries
    from ingest import config
    from ingest.http import make_app
    from ingest.sinks.memory import MemorySink
    if shape == "mixed":
        cases = [environ_template(e) for e in load_entries(None, MIXED_REQUESTS, 1)]
        clock = lambda: FIXED_NOW   # noqa: E731 - the log's event times are near it
    else:
        method, path, content_type, body = _request_parts(shape)
        cases = [environ_template((method, path.encode(), (content_type or "").encode(), body,
                                   None))]
        clock = time.time
    if kestrel_address:
        from ingest.kestrel.client import Client
        from ingest.sinks.kestrel import KestrelSink
        sink = KestrelSink(Client([kestrel_address]))
    else:
        sink = MemorySink()
    app = make_app(config.resolve({}, environ={}), sink, clock)
    if worker_gc:
        # The worker's settings (ingest/worker.py): start-up objects frozen, young
        # collections every 50,000 allocations.
        gc.collect()
        gc.freeze()
        gc.set_threshold(50000, 20, 20)

    def start_response(status, headers, exc_info=None):
        if answers is not None:
            answers.append((status, []))
        if not status.startswith("200") and shape != "mixed":
            raise SystemExit("the pipeline answered %s" % status)

    def one():
        for env, body in cases:
            environ = dict(env)
            environ["wsgi.input"] = io.BytesIO(body)
            for chunk in app(environ, start_response):
                if answers is not None:
                    answers[-1][1].append(chunk)
        if not kestrel_address:
            sink.items.clear()
    return one


def _child(argv):
    """Inside valgrind: run `count` requests of `shape`."""
    import logging
    logging.disable(logging.WARNING)   # the mixed log's ~1% malformed requests log warnings
    shape, count, address = argv[0], int(argv[1]), argv[2] if len(argv) > 2 else None
    one = pipeline(shape, address)
    for _ in range(count):
        one()


def _seam_child(argv):
    """Inside valgrind: `count` requests of `shape` through the HTTP seam of `mode`
    (worker or hello), pipelined on a socketpair (see --seam)."""
    import warnings
    warnings.simplefilter("ignore")     # eventlet's deprecation banner
    import eventlet
    eventlet.monkey_patch()
    import gc
    import logging

    import eventlet.wsgi
    from eventlet.green import socket as green_socket
    mode, shape, count = argv[0], argv[1], int(argv[2])
    logging.disable(logging.WARNING)
    if mode == "worker":
        from ingest import config
        from ingest.http import make_app
        from ingest.sinks.memory import MemorySink
        from ingest.worker import server_options
        settings = config.resolve({}, environ={})
        app = make_app(settings, MemorySink(), time.time)
        options = server_options(settings)
        server = eventlet.wsgi.Server(None, ("127.0.0.1", 0), app, **options)
        protocol = options["protocol"]
    else:
        from bench.hello import app
        server = eventlet.wsgi.Server(None, ("127.0.0.1", 0), app, log_output=False,
                                      debug=False, keepalive=True)
        protocol = eventlet.wsgi.HttpProtocol
    gc.collect()
    gc.freeze()
    gc.set_threshold(50000, 20, 20)          # the worker's (ingest/worker.py tune_gc)
    client, server_side = socket.socketpair()
    for sock in (client, server_side):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 << 20)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
    client.sendall(http_request(shape) * count)
    client.shutdown(socket.SHUT_WR)          # the connection ends after the last one
    conn = green_socket.socket(fileno=server_side.detach())
    protocol([("127.0.0.1", 50000), conn, eventlet.wsgi.STATE_IDLE], server)
    answers = b""
    while True:
        chunk = client.recv(1 << 20)
        if not chunk:
            break
        answers += chunk
    if answers.count(b" 200 OK\r\n") != count:
        raise SystemExit("%s answered %r" % (mode, answers[:300]))


def per_seam_request(mode, shape, requests):
    counts = [_callgrind_child("--seam-child", mode, shape, str(n))
              for n in (WARM_REQUESTS, WARM_REQUESTS + requests)]
    return (counts[1] - counts[0]) / float(requests)


def _callgrind_child(*args):
    """Instructions of `python -m bench.instructions ARGS` under callgrind."""
    argv = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
            sys.executable, "-m", "bench.instructions"] + list(args)
    # A fixed hash seed: with a random one, dict and set layouts (and so the count) move
    # by about 1% from run to run.
    env = dict(os.environ, PYTHONHASHSEED="0")
    out = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return _collected(out.stderr)


def _collected(stderr):
    for line in stderr.splitlines():
        if "Collected :" in line:
            return int(line.rsplit(":", 1)[1])
    raise SystemExit("valgrind gave no count:\n" + stderr[-2000:])


def _instructions(shape, count, address):
    return _callgrind_child("--child", shape, str(count), *([address] if address else []))


def _process_count(argv, drive):
    """Instructions of `python -m ARGV PORT` (a server on a loopback port it takes as its
    last argument) under callgrind, through `drive(host, port)` and until SIGTERM."""
    from testkit.procs import LOOPBACK, free_port, port_open
    port = free_port()
    env = dict(os.environ, PYTHONHASHSEED="0")
    proc = subprocess.Popen(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                             sys.executable, "-W", "ignore", "-m"] + argv + [str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not port_open(LOOPBACK, port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("%s did not start under valgrind" % argv[0])
            time.sleep(0.2)  # poll interval: valgrind takes seconds to start Python
        drive(LOOPBACK, port)
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=300)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    return _collected(err)


def _exchange(host, port, request, count, answer_ends):
    """Send `request` `count` times on one connection, each after the previous answer
    (recognised by its last bytes, `answer_ends`) came back whole."""
    with socket.create_connection((host, port), timeout=120) as sock:
        for _ in range(count):
            sock.sendall(request)
            got = b""
            while not got.endswith(answer_ends):
                chunk = sock.recv(65536)
                if not chunk:
                    raise SystemExit("connection closed after %r" % got[-200:])
                got += chunk


def _request_parts(shape):
    """(method, path, content type or None, body) of one request of wrk_bench's `shape`."""
    from bench import wrk_bench
    path, form, _events = wrk_bench.shape(shape)
    if form is None:
        return "GET", path, None, b""
    return "POST", path, wrk_bench.FORM, form.encode()


def http_request(shape):
    """The bytes of one keep-alive HTTP/1.1 request of wrk_bench's `shape`."""
    from testkit import rawhttp
    method, path, content_type, body = _request_parts(shape)
    headers = [("Content-Type", content_type)] if content_type else []
    return rawhttp.request(method, path, headers, body, close=False)


def mixed_requests():
    """The bytes of the mixed shape's requests, their event times near now (the worker
    keeps its own clock: events five days old would be refused)."""
    from bench import make_log, replay
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "mixed.log")
        make_log.generate(log, MIXED_REQUESTS, seed=1, start_time=time.time() - 60)
        return replay.build_requests(replay.load_log(log)[0], "http://127.0.0.1:8080")


def _replay_passes(host, port, requests, passes):
    """Send `requests` `passes` times on one keep-alive connection, each request after
    the previous answer came back whole."""
    from bench import replay
    client = replay.Client(socket, (host, port), 120)
    try:
        for _ in range(passes):
            for raw in requests:
                client.request(raw)
    finally:
        client.close()


def per_process_request(shape, requests, queue_address=None):
    """Instructions per request of `ingest serve` (or of bench.hello without a queue)."""
    if queue_address:
        argv = ["ingest", "serve", "--kestrel", queue_address, "--host", "127.0.0.1",
                "--port"]
    else:
        argv = ["bench.hello", "--host", "127.0.0.1", "--port"]
    if shape == "mixed":      # one pass, then three: the difference is two passes
        raws = mixed_requests()
        counts = [_process_count(argv, lambda host, port, n=n: _replay_passes(
            host, port, raws, n)) for n in (1, 3)]
        return (counts[1] - counts[0]) / (2.0 * len(raws))
    request = http_request(shape)
    counts = [_process_count(argv, lambda host, port, n=n: _exchange(
        host, port, request, n, b"\r\n\r\n1")) for n in (WARM_REQUESTS, WARM_REQUESTS + requests)]
    return (counts[1] - counts[0]) / float(requests)


def queue_batch():
    """50 `set`s of the batch shape's event, cleaned as a worker writes it."""
    from bench.wrk_bench import event
    record = event(1)
    record["properties"].update(time=1795662710.123, mp_processing_time_ms=1795662710123,
                                ip="127.0.0.1")
    data = json.dumps(record, separators=(",", ":")).encode()
    return b"set events 0 0 %d\r\n%s\r\n" % (len(data), data) * 50


def per_queue_set(batches, workdir):
    argv = ["ingest", "queue", "--data", workdir, "--sync-ms", "100", "--host", "127.0.0.1",
            "--port"]
    batch = queue_batch()
    counts = []
    for n in (WARM_REQUESTS, WARM_REQUESTS + batches):
        shutil.rmtree(workdir, ignore_errors=True)
        os.makedirs(workdir)
        counts.append(_process_count(argv, lambda host, port, n=n: _exchange(
            host, port, batch, n, b"STORED\r\n" * 50)))
    return (counts[1] - counts[0]) / float(batches * 50)


def per_request(shape, requests, address=None):
    if shape == "mixed":      # each call is a pass over MIXED_REQUESTS requests
        few = _instructions(shape, 1, address)
        many = _instructions(shape, 3, address)
        return (many - few) / (2.0 * MIXED_REQUESTS)
    few = _instructions(shape, WARM_REQUESTS, address)
    many = _instructions(shape, WARM_REQUESTS + requests, address)
    return (many - few) / float(requests)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return _child(argv[1:])
    if argv[:1] == ["--seam-child"]:
        return _seam_child(argv[1:])
    p = argparse.ArgumentParser(prog="python -m bench.instructions",
                                description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="single,batch50")
    p.add_argument("--requests", type=int, default=200,
                   help="requests counted per shape (mixed: always two passes over 400)")
    p.add_argument("--kestrel", action="store_true",
                   help="through the Kestrel client to a bundled queue, not a MemorySink")
    p.add_argument("--processes", action="store_true",
                   help="the whole worker process and the bare hello-world")
    p.add_argument("--seam", action="store_true",
                   help="the worker's HTTP seam and app in process, and the hello-world's")
    p.add_argument("--queue", action="store_true",
                   help="the bundled queue server, per set of 50-set batches")
    args = p.parse_args(argv)
    if shutil.which("valgrind") is None:
        raise SystemExit("bench.instructions needs valgrind (apt-get install valgrind)")
    from bench.wrk_bench import shape as shape_of
    queue, workdir = None, tempfile.mkdtemp(prefix="instructions-")
    try:
        if args.queue:
            n = per_queue_set(args.requests, os.path.join(workdir, "queue-data"))
            print("queue    %10.0f instructions per set (batches of 50)" % n, flush=True)
            return 0
        if args.seam:
            for shape in args.shapes.split(","):
                worker = per_seam_request("worker", shape, args.requests)
                hello = per_seam_request("hello", shape, args.requests)
                print("%-8s HTTP seam and app %10.0f, hello-world %8.0f instructions per"
                      " request (%.2f times)" % (shape, worker, hello, worker / hello),
                      flush=True)
            return 0
        if args.kestrel or args.processes:
            from testkit.procs import QueueServer
            queue = QueueServer(workdir, sync_ms=100, quiet=True).start()
        if args.processes:
            for shape in args.shapes.split(","):
                hello = per_process_request(shape, args.requests)
                worker = per_process_request(shape, args.requests, queue.address)
                print("%-8s worker process %10.0f, hello-world %8.0f instructions per request"
                      " (%.2f times)" % (shape, worker, hello, worker / hello), flush=True)
            return 0
        for shape in args.shapes.split(","):
            n = per_request(shape, args.requests, queue.address if queue else None)
            if shape == "mixed":
                print("mixed    %10.0f instructions per request of the mixed SDK log (%d"
                      " requests, bench.make_log's seed 1)%s" % (
                          n, MIXED_REQUESTS, " (Kestrel client to a bundled queue)" if queue
                          else ""), flush=True)
                continue
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
