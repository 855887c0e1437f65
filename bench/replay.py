"""Replay an access-log capture against one server, count what its answers say, report.

    python -m bench.replay --log FILE --url URL [--order random|recorded] [--speed X]
        [--shift-time] [--verbose] [--processes P] [--concurrency C] [--duration S]
        [--rate R] [--out DIR] [--baseline | --baseline-url URL] [--max-rejected PCT]

P processes x C green threads, each green thread owning one persistent HTTP/1.1
connection (the shape of the 2011 benchmark: client processes with 25 green threads).

- `--order random` (the default) draws each request at random from the log, closed loop
  (the next request as soon as the previous answer arrived) or, with --rate R, on an
  open-loop schedule of R requests/s shared by all threads, latency measured from the
  scheduled send time so a stalled server shows up as latency instead of silently
  lowering the offered load.
- `--order recorded` sends every logged request once, in log order, at the recorded
  pace divided by --speed (1 = as recorded, 0 = as fast as the connections go); latency
  is measured from the scheduled time too.

Only the ingestion paths are replayed by default (bench/capture.py); `--shift-time` moves
every record's time so the newest lands at now (bench/payload.py); `--verbose` asks for
verbose answers.  Each answer is read for what it says about the request's records:
accepted, rejected by reason, or not told (bench/outcome.py); more rejected records than
--max-rejected percent fails the run (exit status 3, and a red line in report.md).

The log is the JSON-lines format deploy/nginx.conf writes (`ingest_access`; only its
captured lines carry the query string and body, INGEST_ACCESS_LOG_CAPTURE_PERCENT, and
the others are skipped), or nginx's default "combined" format (GET requests only, since
it has no bodies).  The client's X-Forwarded-For, when logged, is sent again ahead of the
logged peer address.

The HTTP client is a deliberately small raw-socket one: the load generator must not be
the bottleneck, and a general-purpose library costs several times more CPU per request.
It must not follow redirects, retry failed requests (except once on a keep-alive
connection the server closed while idle), or talk to anything but the given URL.
"""
import argparse
import base64
import ctypes
import datetime
import os
import random
import re
import resource
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from array import array
from multiprocessing import connection as mp_connection
from multiprocessing import get_context

from bench import capture, cpu, outcome, payload
from bench.capture import build_request, load_log  # noqa: F401  (the names others import)
from testkit.procs import LOOPBACK, ROOT, Proc, free_port, pinned

DEFAULT_CONCURRENCY = 25
DEFAULT_DURATION_S = 10.0
READY_TIMEOUT_S = 30.0
ERROR_BACKOFF_S = 0.01
# Keep at most this much of an answer's body: enough for any verbose or strict answer.
MAX_BODY_KEPT = 1 << 16
EXIT_TOO_MANY_REJECTED = 3


# ==== the log -> the requests to send =====================================================

def build_requests(entries, url):
    """The request bytes alone, as they are sent (for tools that only need those)."""
    host, prefix = capture.split_url(url)
    return [build_request(e, host, prefix) for e in entries]


# ==== a minimal HTTP/1.1 client ===========================================================

class HttpError(Exception):
    """The server's reply was not HTTP we understand (counted as an error)."""


_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)")


class Client:
    """One persistent connection; not shared between green threads."""

    def __init__(self, sock_module, address, timeout_s):
        self.socket_module = sock_module
        self.address = address
        self.timeout_s = timeout_s
        self.sock = None
        self.used = False  # True once a response came back on this connection
        self.connects = 0

    def connect(self):
        s = self.socket_module.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(self.timeout_s)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            s.connect(self.address)
        except BaseException:
            s.close()
            raise
        self.sock, self.used = s, False
        self.connects += 1

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def request(self, raw):
        """Send one request, read the whole response; returns (status, body), the body
        cut at MAX_BODY_KEPT bytes."""
        if self.sock is None:
            self.connect()
        reused = self.used
        try:
            try:
                self.sock.sendall(raw)
            except (BrokenPipeError, ConnectionResetError):
                raise _IdleClosed() from None
            return self._read_response()
        except _IdleClosed:
            # A keep-alive connection the server closed while it was idle: the request
            # never reached it, so one retry on a fresh connection is safe.
            self.close()
            if not reused:
                raise ConnectionResetError("connection closed before a response")
            self.connect()
            self.sock.sendall(raw)
            return self._read_response()
        except BaseException:
            self.close()
            raise

    def _recv(self):
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionResetError("connection closed mid-response")
        return data

    def _read_response(self):
        sock = self.sock
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            raise _IdleClosed() from None
        if not data:
            raise _IdleClosed()
        # PERF: one recv usually holds the whole reply (~150 bytes), so the common path
        # is a find, a slice and a regex search on the lower-cased head.
        end = data.find(b"\r\n\r\n")
        while end < 0:
            data += self._recv()
            end = data.find(b"\r\n\r\n")
        head = data[:end].lower()
        if not head.startswith(b"http/1."):
            raise HttpError("not an HTTP response: %r" % data[:40])
        status = int(head[9:12])
        body = data[end + 4:]
        m = _CONTENT_LENGTH.search(head)
        if m is not None:
            missing = int(m.group(1)) - len(body)
            while missing > 0:
                chunk = self._recv()
                missing -= len(chunk)
                if len(body) < MAX_BODY_KEPT:
                    body += chunk
        elif b"\r\ntransfer-encoding: chunked" in head:
            body = self._read_chunked(body)
        elif status >= 200 and status not in (204, 304):
            return status, self._read_to_close(body)
        self.used = True
        if b"\r\nconnection: close" in head or head.startswith(b"http/1.0"):
            self.close()
        return status, body

    def _read_chunked(self, buf):
        pos, body = 0, b""
        while True:
            eol = buf.find(b"\r\n", pos)
            while eol < 0:
                buf += self._recv()
                eol = buf.find(b"\r\n", pos)
            size = int(buf[pos:eol].split(b";")[0], 16)
            need = eol + 2 + size + 2
            while len(buf) < need:
                buf += self._recv()
            if len(body) < MAX_BODY_KEPT:
                body += buf[eol + 2:eol + 2 + size]
            pos = need
            if size == 0:  # no trailers from the servers we test
                return body

    def _read_to_close(self, body):
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            if len(body) < MAX_BODY_KEPT:
                body += chunk
        self.close()
        return body


class _IdleClosed(Exception):
    pass


# ==== one load generator process ========================================================

class _State:
    """What the green threads of one process share (no locks: one OS thread)."""

    def __init__(self):
        self.stop = False
        self.next_slot = 0.0
        self.next_index = 0
        # Counted apart from the per-second buckets, so the report can check that the
        # buckets lost or double-counted nothing.
        self.total = 0
        self.swap()

    def swap(self):
        """Start a new one-second bucket; returns the old one: latencies of answers
        without error, latencies of 5xx answers, statuses, errors, record counts."""
        old = (getattr(self, "lat", None), getattr(self, "err_lat", None),
               getattr(self, "status", None), getattr(self, "errors", None),
               getattr(self, "records", None))
        self.lat, self.err_lat, self.status, self.errors, self.records = (
            array("d"), array("d"), {}, {}, {})
        return old


def _send(state, client, request, start, perf, timeout_types):
    """Send one prepared request, time it, count its answer and its records."""
    raw, n, strict = request
    state.total += 1
    try:
        status, body = client.request(raw)
    except timeout_types:
        _count(state.errors, "timeout")
        outcome.tally(state.records, 599, None, n, strict)
        return
    except (OSError, HttpError, ValueError) as exc:
        _count(state.errors, type(exc).__name__)
        outcome.tally(state.records, 599, None, n, strict)
        # Back off a little so a dead server costs a few errors per second per
        # thread, not a CPU-bound spin that would starve the other threads.
        import eventlet
        eventlet.sleep(ERROR_BACKOFF_S)
        return
    (state.err_lat if status >= 500 else state.lat).append(perf() - start)
    status_counts = state.status
    status_counts[status] = status_counts.get(status, 0) + 1
    outcome.tally(state.records, status, body, n, strict)


def _random_worker(state, client, requests, rnd, interval, timeout_types):
    """One green thread: draw, send, time, repeat until told to stop."""
    import eventlet
    perf = time.perf_counter
    pick = rnd.choice
    while not state.stop:
        start = perf()
        if interval:
            # Open loop: take the next slot of the schedule and wait for it; latency
            # counts from the slot, so time spent queued behind a slow server shows.
            slot = state.next_slot
            state.next_slot = slot + interval
            if slot > start:
                eventlet.sleep(slot - start)
                if state.stop:
                    return
            start = slot
        _send(state, client, pick(requests), start, perf, timeout_types)


def _recorded_worker(state, client, requests, offsets, timeout_types):
    """One green thread: take the next request in log order, wait for its recorded time
    (offsets None: at once), send; the threads together keep the log's order."""
    import eventlet
    perf = time.perf_counter
    while not state.stop:
        i = state.next_index
        if i >= len(requests):
            return
        state.next_index = i + 1
        start = perf()
        if offsets is not None:
            slot = state.next_slot + offsets[i]
            if slot > start:
                eventlet.sleep(slot - start)
                if state.stop:
                    return
            start = slot
        _send(state, client, requests[i], start, perf, timeout_types)


def _count(counts, key):
    counts[key] = counts.get(key, 0) + 1


# prctl(2): the signal a process gets when its parent dies.
PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid):
    """Have the kernel kill this load generator when the replay that started it dies.

    A replay SIGKILLed (by bench.run_all's timeout, or by hand) runs no cleanup, and its
    children would go on sending until their --duration ended."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's _terminated
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
            print("bench.replay: prctl(PR_SET_PDEATHSIG) failed (errno %d): this load "
                  "generator outlives a killed replay" % ctypes.get_errno(), file=sys.stderr)
    except (OSError, AttributeError):     # not Linux: the parent's finally must do
        pass
    if os.getppid() != parent_pid:        # it died before the prctl
        os._exit(1)


def _child(pipe, requests, offsets, cfg, index):
    """Entry point of a load generator process: connect, wait for t0, run, report."""
    _die_with_parent(cfg["parent_pid"])
    import warnings
    warnings.simplefilter("ignore")  # eventlet's deprecation banner
    import eventlet
    from eventlet.green import socket as green_socket
    if cfg["cpus"]:
        os.sched_setaffinity(0, cfg["cpus"])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles ^C and tells us
    address = (cfg["host"], cfg["port"])
    clients = [Client(green_socket, address, cfg["timeout_s"]) for _ in range(cfg["concurrency"])]
    connect_errors = 0
    for c in clients:
        try:
            c.connect()
        except OSError:
            connect_errors += 1  # retried by the first request
    pipe.send(("ready", index, connect_errors))
    t0 = pipe.recv()
    delay = t0 - time.monotonic()
    if delay > 0:
        time.sleep(delay)  # all processes start sending at the same instant t0
    state = _State()
    state.next_slot = time.perf_counter() + (t0 - time.monotonic())
    pool = eventlet.GreenPool(len(clients))
    timeouts = (socket.timeout, TimeoutError)
    if cfg["order"] == "recorded":
        for c in clients:
            pool.spawn(_recorded_worker, state, c, requests, offsets, timeouts)
    else:
        rate = cfg["rate"] / cfg["processes"] if cfg["rate"] else 0.0
        base_seed = cfg["seed"] * 1000003 + index * 7919
        for i, c in enumerate(clients):
            pool.spawn(_random_worker, state, c, requests, random.Random(base_seed + i),
                       1.0 / rate if rate else 0.0, timeouts)
    _report_seconds(pipe, state, pool, t0, cfg["duration_s"])
    for c in clients:
        c.close()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    pipe.send(("done", index, {"user_s": usage.ru_utime, "system_s": usage.ru_stime,
                               "connects": sum(c.connects for c in clients),
                               "requests": state.total}))


def _report_seconds(pipe, state, pool, t0, duration_s):
    """Every second, hand the finished bucket to the parent; stop at t0 + duration, or
    once every thread is done (a recorded replay that reached the end of the log)."""
    import eventlet
    from eventlet.event import Event
    finished = Event()
    eventlet.spawn_n(lambda: (pool.waitall(), finished.send(True)))
    end = t0 + duration_s if duration_s else None
    k = 0
    while True:
        k += 1
        target = t0 + k if end is None else min(t0 + k, end)
        delay = target - time.monotonic()
        if delay > 0 and not finished.ready():
            finished.wait(timeout=delay)
        if finished.ready() or (end is not None and target >= end):
            break
        _send_bucket(pipe, k, state.swap())
    # Let in-flight requests finish (each bounded by the socket timeout) so that every
    # request started is counted once, in the last second.
    state.stop = True
    pool.waitall()
    _send_bucket(pipe, k, state.swap(), elapsed=time.monotonic() - t0)


def _send_bucket(pipe, k, bucket, elapsed=None):
    lat, err_lat, status, errors, records = bucket
    pipe.send(("second", k, lat.tobytes(), err_lat.tobytes(), status, errors, records, elapsed))


# ==== the parent: start processes, merge their seconds, print progress ==================

class Second:
    """One second of the run, merged over all processes."""

    def __init__(self, t):
        self.t = t
        self.latencies = array("d")         # answers without error
        self.error_latencies = array("d")   # 5xx answers
        self.status = {}
        self.errors = {}                    # connection errors, timeouts, bad replies
        self.records = {}
        self.reports = 0

    def add(self, lat_bytes, err_lat_bytes, status, errors, records):
        self.latencies.frombytes(lat_bytes)
        self.error_latencies.frombytes(err_lat_bytes)
        for into, counts in ((self.status, status), (self.errors, errors),
                             (self.records, records)):
            for key, n in counts.items():
                into[key] = into.get(key, 0) + n
        self.reports += 1

    @property
    def error_count(self):
        return sum(self.errors.values()) + len(self.error_latencies)

    @property
    def ok(self):
        return len(self.latencies)

    @property
    def requests(self):
        return self.ok + self.error_count


def _progress_line(label, sec):
    lat = sorted(sec.latencies)
    p50 = lat[len(lat) // 2] * 1000 if lat else 0.0
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000 if lat else 0.0
    rejected = sum(n for k, n in sec.records.items() if k.startswith("rejected:"))
    return ("[%s] t=%3ds  %8.0f ok req/s  p50 %7.2f ms  p99 %7.2f ms  errors %d  "
            "records accepted %d rejected %d" % (label, sec.t, sec.ok, p50, p99, sec.error_count,
                                                 sec.records.get("accepted", 0), rejected))


def run_load(requests, url, processes=1, concurrency=DEFAULT_CONCURRENCY, duration_s=10.0,
             rate=None, timeout_s=10.0, cpus=None, seed=1, label="target", quiet=False,
             order="random", offsets=None):
    """Run the load against `url`; returns the merged raw run (see report.summarize).

    `requests`: prepare()'s list.  order "random": draw from it for `duration_s`;
    "recorded": send each once in order at `offsets` (seconds from the start; None: as
    fast as possible), stopping early after `duration_s` if given."""
    parts = urllib.parse.urlsplit(url)
    cfg = {"host": socket.gethostbyname(parts.hostname), "port": parts.port or 80,
           "processes": processes, "concurrency": concurrency, "duration_s": duration_s,
           "rate": rate, "timeout_s": timeout_s, "cpus": cpus, "seed": seed, "order": order,
           "parent_pid": os.getpid()}
    ctx = get_context("fork")  # children inherit the prebuilt requests copy-on-write
    pipes, procs = [], []
    try:
        for i in range(processes):
            share, share_offsets = requests, None
            if order == "recorded":   # every P-th request, so the processes keep the order
                share = requests[i::processes]
                share_offsets = offsets[i::processes] if offsets is not None else None
            parent_end, child_end = ctx.Pipe()
            p = ctx.Process(target=_child, args=(child_end, share, share_offsets, cfg, i),
                            daemon=True)
            p.start()
            child_end.close()
            pipes.append(parent_end)
            procs.append(p)
        return _drive(pipes, procs, cfg, label, quiet)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(5)


def _drive(pipes, procs, cfg, label, quiet):
    connect_errors = 0
    for pipe in pipes:
        if not pipe.poll(READY_TIMEOUT_S):
            raise RuntimeError("load generator process did not start")
        connect_errors += pipe.recv()[2]
    t0 = time.monotonic() + 0.05
    for pipe in pipes:
        pipe.send(t0)
    seconds, done, elapsed = {}, {}, []
    # The children report every second: silence this long means one is stuck.
    silence_s = cfg["timeout_s"] * 2 + 30
    last_heard = time.monotonic()
    live = list(pipes)
    while live:
        if time.monotonic() - last_heard > silence_s:
            raise RuntimeError("load generator processes stopped reporting")
        for pipe in mp_connection.wait(live, timeout=1.0):
            last_heard = time.monotonic()
            try:
                msg = pipe.recv()
            except EOFError:
                live.remove(pipe)
                continue
            if msg[0] == "second":
                _, k, lat_bytes, err_bytes, status, errors, records, end = msg
                sec = seconds.setdefault(k, Second(k))
                sec.add(lat_bytes, err_bytes, status, errors, records)
                if end is not None:
                    elapsed.append(end)
                if sec.reports == len(pipes) and not quiet:
                    print(_progress_line(label, sec), file=sys.stderr, flush=True)
            elif msg[0] == "done":
                done[msg[1]] = msg[2]
                live.remove(pipe)
    for p in procs:
        p.join(10)
    return {"label": label, "config": cfg, "seconds": [seconds[k] for k in sorted(seconds)],
            "elapsed_s": max(elapsed) if elapsed else cfg["duration_s"],
            "children": [done[i] for i in sorted(done)], "connect_errors": connect_errors}


# ==== server CPU, from /proc (Linux) =====================================================

def measured_run(requests, url, args, label, server=None, offsets=None):
    """run_load plus the server's (and helpers') CPU and every core's load meanwhile.

    `server`: a cpu.ServerProcesses (one pid, several, or a supervisord's children)."""
    helpers = cpu.ServerProcesses(pids=args.helper_pid)
    before = server.snapshot() if server else None
    helpers_before = helpers.snapshot()
    cores_before = cpu.cores_busy()
    run = run_load(requests, url, processes=args.processes, concurrency=args.concurrency,
                   duration_s=args.duration, rate=args.rate, timeout_s=args.timeout,
                   cpus=args.cpus, seed=args.seed, label=label, order=args.order,
                   offsets=offsets)
    # Other processes on the same cores skew every figure; this makes that visible.
    cores_after = cpu.cores_busy()
    run["cores_busy"] = cpu.busy_shares(cores_before, cores_after)
    run["cores_steal"] = cpu.steal_shares(cores_before, cores_after)
    if server:
        run["server_cpu"] = cpu.group_usage(before, server.snapshot(), run["elapsed_s"])
        run["server_cpu_core_share"] = run["server_cpu"]["core_share"]
    if args.helper_pid:
        usage = cpu.group_usage(helpers_before, helpers.snapshot(), run["elapsed_s"])
        run["helpers_cpu_core_share"] = usage["core_share"]
    return run


# ==== the baseline hello server ==========================================================

def start_hello(cpu, logdir, timeout_s=15.0):
    """Start bench.hello on a free loopback port (pinned to `cpu` unless None), its output
    in `logdir`; polls until it listens.  Returns (testkit Proc, url); stop it by pid with
    proc.stop()."""
    port = free_port()
    argv = pinned(cpu, [sys.executable, "-m", "bench.hello", "--port", str(port)])
    proc = Proc("hello", argv, logdir).start().wait_port(LOOPBACK, port, timeout_s)
    return proc, "http://%s:%d" % (LOOPBACK, port)


# ==== command line =======================================================================

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.replay",
                                description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--log", required=True, help="access log (ingest_access JSON lines or combined)")
    p.add_argument("--url", required=True, help="server under test, http://host:port[/prefix]")
    p.add_argument("--order", choices=("random", "recorded"), default="random",
                   help="random: draw requests at random for --duration (default); "
                        "recorded: send every logged request once, in log order")
    p.add_argument("--speed", type=float, default=1.0,
                   help="with --order recorded: 1 = the recorded pace, 2 = twice as fast, "
                        "0 = as fast as possible (default 1)")
    p.add_argument("--shift-time", action="store_true",
                   help="move every record's time so the newest lands at now, gaps kept "
                        "(an old capture would otherwise be refused as time_too_old)")
    p.add_argument("--verbose", action="store_true",
                   help="ask for verbose answers (verbose=1), which name why records were "
                        "rejected; plain answers only say 1 or 0")
    p.add_argument("--all-paths", action="store_true",
                   help="replay every logged path, not only /track /engage /groups /import")
    p.add_argument("--skip-status", default="401",
                   help="drop entries recorded with these statuses, comma-separated, or "
                        "'none' (default 401: the log holds no credentials)")
    p.add_argument("--import-secret", default=None,
                   help="send /import requests with this API secret (Basic auth)")
    p.add_argument("--max-rejected", type=float, default=1.0,
                   help="fail (exit status 3) when more than this percentage of the "
                        "target's records were rejected (default 1)")
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                   help="green threads (= connections) per process (default 25)")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds of load per target (default 10; with --order recorded: "
                        "until the log ends)")
    p.add_argument("--rate", type=float, default=None,
                   help="target total requests/s (open loop, --order random); default: "
                        "as fast as possible")
    p.add_argument("--timeout", type=float, default=10.0, help="per-request socket timeout (s)")
    p.add_argument("--out", default=None, help="report directory (default bench/out/<time>)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--cpus", default=None,
                   help="pin the load generator processes to these cores, e.g. 1 or 0,1")
    p.add_argument("--server-pid", type=int, action="append", default=[],
                   help="pid of the server under test, to report its CPU; repeatable "
                        "(several workers: their CPU is added up)")
    p.add_argument("--server-children", type=int, action="append", default=[],
                   help="count every descendant of this pid (e.g. supervisord) as the "
                        "server, except the --helper-pid ones; repeatable")
    base = p.add_mutually_exclusive_group()
    base.add_argument("--baseline", action="store_true",
                      help="also run the same load against a bare eventlet hello-world that "
                           "this command starts, and report the ratio")
    base.add_argument("--baseline-url", default=None,
                      help="like --baseline, against an already running bench.hello")
    p.add_argument("--baseline-cpu", type=int, default=None,
                   help="with --baseline: pin the hello server to this core (taskset)")
    p.add_argument("--baseline-pid", type=int, default=None,
                   help="pid of the --baseline-url server, to report its CPU share")
    p.add_argument("--helper-pid", type=int, action="append", default=[],
                   help="pid of a process the server needs (e.g. its queue): its CPU is "
                        "reported and not counted as disturbance; repeatable")
    p.add_argument("--label", default="target", help="name of the server under test in reports")
    p.add_argument("--note", action="append", default=[],
                   help="a line of context for report.md (e.g. core pinning); repeatable")
    args = p.parse_args(argv)
    _check_args(p, args)
    return args


def _check_args(p, args):
    for name in ("processes", "concurrency", "timeout"):
        if getattr(args, name) <= 0:
            p.error("--%s must be positive" % name)
    if args.duration is not None and args.duration <= 0:
        p.error("--duration must be positive")
    if args.order == "random" and args.duration is None:
        args.duration = DEFAULT_DURATION_S
    if args.rate is not None and (args.rate <= 0 or args.order == "recorded"):
        p.error("--rate must be positive, and goes with --order random (recorded "
                "replays keep the log's own pace: see --speed)")
    if args.speed < 0:
        p.error("--speed must be 0 (as fast as possible) or more")
    if not 0 <= args.max_rejected <= 100:
        p.error("--max-rejected is a percentage, 0 to 100")
    try:
        args.skip_status = () if args.skip_status.strip().lower() == "none" else tuple(
            int(c) for c in args.skip_status.split(",") if c.strip())
    except ValueError:
        p.error("--skip-status takes HTTP statuses such as 401,403, or none")
    args.cpus = sorted({int(c) for c in args.cpus.split(",")}) if args.cpus else None


def mode_text(args):
    """How the requests were sent, in words, for reports and plot titles."""
    if args.order == "recorded":
        text = ("recorded order at %gx the recorded pace" % args.speed if args.speed
                else "recorded order, as fast as possible")
    elif args.rate:
        text = "random draws, open loop at %g req/s" % args.rate
    else:
        text = "random draws, closed loop"
    extras = [w for w, on in (("times shifted to now", args.shift_time),
                              ("verbose answers", args.verbose)) if on]
    return text + ("; " + ", ".join(extras) if extras else "")


def git_commit():
    """The checkout's commit (short), "+changes" when tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT,
                               timeout=10).returncode == 1
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+changes" if dirty else "")


def load(args):
    """The log -> (entries to replay, their send offsets or None, meta about the log)."""
    entries, skipped = load_log(args.log)
    kept, dropped = capture.select(entries, args.all_paths, args.skip_status)
    if not kept:
        raise SystemExit("replay: no requests to replay in %s (%d lines not requests, "
                         "dropped: %s)" % (args.log, skipped, dropped or "none"))
    shift_s = 0.0
    if args.shift_time:
        kept, shift_s = payload.shift_entries(kept, time.time())
    if args.verbose:
        kept = [payload.with_verbose(e) for e in kept]
    offsets = capture.schedule(kept, args.speed) if args.order == "recorded" else None
    meta = {"log": os.path.abspath(args.log), "log_entries": len(kept), "log_skipped": skipped,
            "log_dropped": dropped, "time_shift_s": round(shift_s, 3),
            "recorded_span_s": (round(capture.schedule(kept, 1.0)[-1], 3)
                                if args.order == "recorded" else None)}
    print("replay: %d requests to replay from %s (%d lines not requests; dropped: %s)%s"
          % (len(kept), args.log, skipped, dropped or "none",
             "; times shifted by %.0f s" % shift_s if args.shift_time else ""), file=sys.stderr)
    return kept, offsets, meta


def requests_for(entries, url, args, described=None):
    """prepare()'s list for one URL; `described` reuses the (records, strict) counts."""
    host, prefix = capture.split_url(url)
    auth = (b"Basic " + base64.b64encode(args.import_secret.encode("utf-8") + b":")
            if args.import_secret else None)
    if described is None:
        described = describe(entries)
    return [(build_request(e, host, prefix, auth), n, strict)
            for e, (n, strict) in zip(entries, described)]


def describe(entries):
    """(records in it, strict /import) for each entry."""
    out = []
    for e in entries:
        p = payload.Payload(e)
        out.append((len(p.records or ()), payload.is_strict(e, p)))
    return out


def _terminated(signum, frame):
    """SIGTERM (bench.run_all stopping a replay) unwinds like ^C, so that run_load's
    finally stops the load generator processes."""
    raise SystemExit(128 + signum)


def main(argv=None):
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminated)
    from bench import report  # matplotlib is imported only when writing plots
    entries, offsets, log_meta = load(args)
    described = describe(entries)
    out = args.out or os.path.join("bench", "out", time.strftime("replay-%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)
    runs = {}
    hello = None
    load_before = list(os.getloadavg())
    try:
        base_url, base_pid = args.baseline_url, args.baseline_pid
        if args.baseline:
            hello, base_url = start_hello(args.baseline_cpu, out)
            base_pid = hello.pid
        if base_url:
            runs["baseline"] = measured_run(
                requests_for(entries, base_url, args, described), base_url, args, "baseline",
                cpu.ServerProcesses([base_pid] if base_pid else ()), offsets)
    finally:
        if hello is not None:
            hello.stop()
    server = cpu.ServerProcesses(args.server_pid, args.server_children, args.helper_pid)
    runs["target"] = measured_run(requests_for(entries, args.url, args, described), args.url,
                                  args, args.label, server, offsets)
    meta = dict(log_meta, url=args.url, baseline_url=base_url,
                command="python -m bench.replay " + shlex.join(
                    sys.argv[1:] if argv is None else [str(a) for a in argv]),
                mode=mode_text(args), order=args.order,
                speed=args.speed if args.order == "recorded" else None,
                shift_time=args.shift_time, verbose=args.verbose,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                commit=git_commit(), notes=args.note, cpu_count=os.cpu_count(),
                loadavg_before=load_before, loadavg_after=list(os.getloadavg()))
    summary = report.write_all(out, runs, meta, max_rejected=args.max_rejected / 100.0)
    print(report.console_summary(summary, color=sys.stderr.isatty()), file=sys.stderr)
    print("report: %s" % os.path.join(out, "report.md"), file=sys.stderr)
    return EXIT_TOO_MANY_REJECTED if summary["records"]["over_threshold"] else 0


if __name__ == "__main__":
    sys.exit(main())
