"""Replay requests drawn at random from an access log against one server, and report.

    python -m bench.replay --log FILE --url URL [--processes P] [--concurrency C]
        [--duration S] [--rate R] [--out DIR] [--baseline | --baseline-url URL]

P processes x C green threads, each green thread owning one persistent HTTP/1.1
connection, each request drawn at random from the pre-processed log (the shape of the
2011 benchmark: client processes with 25 green threads each).  Without --rate the loop is
closed (send the next request as soon as the previous answer arrived); with --rate R the
P x C threads share an open-loop schedule of R requests/s in total, and latency is
measured from the scheduled send time, so a stalled server shows up as latency instead
of silently lowering the offered load.

The log is the JSON-lines format deploy/nginx.conf writes (only its captured lines carry
the query string and body: INGEST_ACCESS_LOG_CAPTURE_PERCENT; the others are skipped),
or nginx's default "combined" format (GET requests only, since it has no bodies).  The
client's X-Forwarded-For, when logged, is sent again ahead of the logged peer address.

The HTTP client is a deliberately small raw-socket one: the load generator must not be
the bottleneck, and a general-purpose library costs several times more CPU per request.
It must not follow redirects, retry failed requests (except once on a keep-alive
connection the server closed while idle), or talk to anything but the given URL.
"""
import argparse
import json
import os
import random
import re
import resource
import shlex
import signal
import socket
import sys
import time
import urllib.parse
from array import array
from multiprocessing import connection as mp_connection
from multiprocessing import get_context

from testkit.procs import LOOPBACK, Proc, cpu_seconds, free_port, pinned

DEFAULT_CONCURRENCY = 25
READY_TIMEOUT_S = 30.0
ERROR_BACKOFF_S = 0.01


# ==== access log -> list of (method, uri, content_type, body, client) =================

_COMBINED = re.compile(
    r'^(?P<addr>\S+) \S+ \S+ \[[^\]]*\] "(?P<method>[A-Z]+) (?P<uri>\S+) HTTP/[0-9.]+" '
    r'(?P<status>\d{3}) ')
_HEX_ESCAPE = re.compile(r"\\x([0-9A-Fa-f]{2})")


def _bytes(text):
    # Lines are decoded with surrogateescape, so raw bytes >= 0x80 that nginx passed
    # through unescaped come back out exactly as they were sent.
    return text.encode("utf-8", "surrogateescape")


def parse_json_line(text):
    """One captured `ingest_access` log line -> entry tuple, or None if it is not one."""
    try:
        rec = json.loads(text)
    except ValueError:
        return None
    if not isinstance(rec, dict) or not rec.get("method") or not rec.get("uri"):
        return None
    # nginx logs an unset variable as "" with escape=json and "-" otherwise.
    content_type = rec.get("content_type") or ""
    body = rec.get("body") or ""
    content_type = "" if content_type == "-" else content_type
    body = "" if body == "-" else body
    forwarded = [a for a in (rec.get("x_forwarded_for"), rec.get("remote_addr"))
                 if a and a != "-"]
    return (rec["method"], _bytes(rec["uri"]), _bytes(content_type), _bytes(body),
            ", ".join(forwarded))


def parse_combined_line(text):
    """One nginx "combined" line -> entry tuple for GET requests, else None."""
    m = _COMBINED.match(text)
    if not m or m.group("method") != "GET":
        return None
    # nginx's default escaping writes bytes < 32 and > 126 and '"' as \xXX.
    uri = _HEX_ESCAPE.sub(lambda h: chr(int(h.group(1), 16)), m.group("uri"))
    return ("GET", uri.encode("latin-1", "replace"), b"", b"", m.group("addr"))


def load_log(path):
    """Read the whole log once; returns (entries, skipped line count)."""
    entries, skipped = [], 0
    with open(path, "rb") as fh:
        for raw in fh:
            text = raw.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
            if not text.strip():
                continue
            parse = parse_json_line if text.lstrip().startswith("{") else parse_combined_line
            entry = parse(text)
            if entry is None:
                skipped += 1
            else:
                entries.append(entry)
    return entries, skipped


def build_request(entry, host_header, prefix=b""):
    """The exact bytes of one HTTP/1.1 request, built once so replay only calls sendall."""
    method, uri, content_type, body, client = entry
    lines = [b"%s %s%s HTTP/1.1" % (method.encode("ascii"), prefix, uri),
             b"Host: " + host_header, b"User-Agent: ingest-bench/1", b"Accept: */*"]
    if client:
        # In production nginx adds this; the worker trusts it from loopback.
        lines.append(b"X-Forwarded-For: " + client.encode("ascii", "replace"))
    if content_type:
        lines.append(b"Content-Type: " + content_type)
    if body or method in ("POST", "PUT"):
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def build_requests(entries, url):
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError("--url must be http://host:port[/prefix], not %r" % url)
    prefix = parts.path.rstrip("/").encode("ascii")
    return [build_request(e, parts.netloc.encode("ascii"), prefix) for e in entries]


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
        """Send one request, read the whole response, return the status code."""
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
                missing -= len(self._recv())
        elif b"\r\ntransfer-encoding: chunked" in head:
            self._read_chunked(body)
        elif status >= 200 and status not in (204, 304):
            self._read_to_close()
            return status
        self.used = True
        if b"\r\nconnection: close" in head or head.startswith(b"http/1.0"):
            self.close()
        return status

    def _read_chunked(self, buf):
        pos = 0
        while True:
            eol = buf.find(b"\r\n", pos)
            while eol < 0:
                buf += self._recv()
                eol = buf.find(b"\r\n", pos)
            size = int(buf[pos:eol].split(b";")[0], 16)
            need = eol + 2 + size + 2
            while len(buf) < need:
                buf += self._recv()
            pos = need
            if size == 0:  # no trailers from the servers we test
                return

    def _read_to_close(self):
        while self.sock.recv(65536):
            pass
        self.close()


class _IdleClosed(Exception):
    pass


# ==== one load generator process ========================================================

class _State:
    """What the green threads of one process share (no locks: one OS thread)."""

    def __init__(self):
        self.stop = False
        self.next_slot = 0.0
        # Counted apart from the per-second buckets, so the report can check that the
        # buckets lost or double-counted nothing.
        self.total = 0
        self.swap()

    def swap(self):
        """Start a new one-second bucket; returns the old one."""
        old = (getattr(self, "lat", None), getattr(self, "status", None),
               getattr(self, "errors", None))
        self.lat, self.status, self.errors = array("d"), {}, {}
        return old


def _worker(state, client, requests, rnd, interval, timeout_types):
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
        state.total += 1
        try:
            status = client.request(pick(requests))
        except timeout_types:
            _count(state.errors, "timeout")
            continue
        except (OSError, HttpError, ValueError) as exc:
            _count(state.errors, type(exc).__name__)
            # Back off a little so a dead server costs a few errors per second per
            # thread, not a CPU-bound spin that would starve the other threads.
            eventlet.sleep(ERROR_BACKOFF_S)
            continue
        state.lat.append(perf() - start)
        status_counts = state.status
        status_counts[status] = status_counts.get(status, 0) + 1


def _count(counts, key):
    counts[key] = counts.get(key, 0) + 1


def _child(pipe, requests, cfg, index):
    """Entry point of a load generator process: connect, wait for t0, run, report."""
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
    rate = cfg["rate"] / cfg["processes"] if cfg["rate"] else 0.0
    interval = 1.0 / rate if rate else 0.0
    state.next_slot = time.perf_counter() + (t0 - time.monotonic())
    pool = eventlet.GreenPool(len(clients))
    base_seed = cfg["seed"] * 1000003 + index * 7919
    for i, c in enumerate(clients):
        rnd = random.Random(base_seed + i)
        pool.spawn(_worker, state, c, requests, rnd, interval, (socket.timeout, TimeoutError))
    _report_seconds(pipe, state, pool, t0, cfg["duration_s"])
    for c in clients:
        c.close()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    pipe.send(("done", index, {"user_s": usage.ru_utime, "system_s": usage.ru_stime,
                               "connects": sum(c.connects for c in clients),
                               "requests": state.total}))


def _report_seconds(pipe, state, pool, t0, duration_s):
    """Every second, hand the finished bucket to the parent; stop at t0 + duration."""
    import eventlet
    end = t0 + duration_s
    k = 0
    while True:
        k += 1
        target = min(t0 + k, end)
        delay = target - time.monotonic()
        if delay > 0:
            eventlet.sleep(delay)
        if target >= end:
            break
        _send_bucket(pipe, k, state.swap())
    # Let in-flight requests finish (each bounded by the socket timeout) so that every
    # request started is counted once, in the last second.
    state.stop = True
    pool.waitall()
    _send_bucket(pipe, k, state.swap(), elapsed=time.monotonic() - t0)


def _send_bucket(pipe, k, bucket, elapsed=None):
    lat, status, errors = bucket
    pipe.send(("second", k, lat.tobytes(), status, errors, elapsed))


# ==== the parent: start processes, merge their seconds, print progress ==================

class Second:
    """One second of the run, merged over all processes."""

    def __init__(self, t):
        self.t = t
        self.latencies = array("d")
        self.status = {}
        self.errors = {}
        self.reports = 0

    def add(self, lat_bytes, status, errors):
        self.latencies.frombytes(lat_bytes)
        for key, n in status.items():
            self.status[key] = self.status.get(key, 0) + n
        for key, n in errors.items():
            self.errors[key] = self.errors.get(key, 0) + n
        self.reports += 1

    @property
    def error_count(self):
        return sum(self.errors.values()) + sum(n for s, n in self.status.items() if s >= 500)

    @property
    def requests(self):
        return len(self.latencies) + sum(self.errors.values())


def _progress_line(label, sec):
    lat = sorted(sec.latencies)
    p50 = lat[len(lat) // 2] * 1000 if lat else 0.0
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000 if lat else 0.0
    return ("[%s] t=%3ds  %8.0f req/s  p50 %7.2f ms  p99 %7.2f ms  errors %d"
            % (label, sec.t, sec.requests, p50, p99, sec.error_count))


def run_load(requests, url, processes=1, concurrency=DEFAULT_CONCURRENCY, duration_s=10.0,
             rate=None, timeout_s=10.0, cpus=None, seed=1, label="target", quiet=False):
    """Run the load against `url`; returns the merged raw run (see report.summarize)."""
    parts = urllib.parse.urlsplit(url)
    cfg = {"host": socket.gethostbyname(parts.hostname), "port": parts.port or 80,
           "processes": processes, "concurrency": concurrency, "duration_s": duration_s,
           "rate": rate, "timeout_s": timeout_s, "cpus": cpus, "seed": seed}
    ctx = get_context("fork")  # children inherit the prebuilt requests copy-on-write
    pipes, procs = [], []
    for i in range(processes):
        parent_end, child_end = ctx.Pipe()
        p = ctx.Process(target=_child, args=(child_end, requests, cfg, i), daemon=True)
        p.start()
        child_end.close()
        pipes.append(parent_end)
        procs.append(p)
    try:
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
    deadline = t0 + cfg["duration_s"] + cfg["timeout_s"] * 2 + 30
    live = list(pipes)
    while live:
        if time.monotonic() > deadline:
            raise RuntimeError("load generator processes did not finish in time")
        for pipe in mp_connection.wait(live, timeout=1.0):
            try:
                msg = pipe.recv()
            except EOFError:
                live.remove(pipe)
                continue
            if msg[0] == "second":
                _, k, lat_bytes, status, errors, end = msg
                sec = seconds.setdefault(k, Second(k))
                sec.add(lat_bytes, status, errors)
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

def proc_cpu_s(pid):
    """User + system CPU seconds used so far by `pid`, or None if unreadable."""
    try:
        return cpu_seconds(pid)
    except (OSError, IndexError):
        return None


def cores_busy():
    """{core: (busy, total) jiffies} from /proc/stat, or {} where unavailable."""
    out = {}
    try:
        with open("/proc/stat") as fh:
            for line in fh:
                name, *values = line.split()
                if name.startswith("cpu") and name != "cpu":
                    ticks = [int(v) for v in values[:8]]
                    idle = ticks[3] + ticks[4]  # idle + iowait
                    out[int(name[3:])] = (sum(ticks) - idle, sum(ticks))
    except OSError:
        pass
    return out


def busy_shares(before, after):
    """Per core, the share of time it was busy (any process) between two readings."""
    shares = {}
    for core, (busy, total) in after.items():
        if core in before and total > before[core][1]:
            shares[str(core)] = round((busy - before[core][0]) / (total - before[core][1]), 3)
    return shares


def _helpers_cpu_s(pids):
    values = [proc_cpu_s(pid) for pid in pids]
    return None if not pids or None in values else sum(values)


def measured_run(requests, url, args, label, server_pid=None):
    """run_load plus the server's (and helpers') CPU share and every core's load meanwhile."""
    before = proc_cpu_s(server_pid) if server_pid else None
    helpers_before = _helpers_cpu_s(args.helper_pid)
    cores_before = cores_busy()
    run = run_load(requests, url, processes=args.processes, concurrency=args.concurrency,
                   duration_s=args.duration, rate=args.rate, timeout_s=args.timeout,
                   cpus=args.cpus, seed=args.seed, label=label)
    after = proc_cpu_s(server_pid) if server_pid else None
    # Other processes on the same cores skew every figure; this makes that visible.
    run["cores_busy"] = busy_shares(cores_before, cores_busy())
    if before is not None and after is not None:
        run["server_cpu_core_share"] = (after - before) / run["elapsed_s"]
    helpers_after = _helpers_cpu_s(args.helper_pid)
    if helpers_before is not None and helpers_after is not None:
        run["helpers_cpu_core_share"] = (helpers_after - helpers_before) / run["elapsed_s"]
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
    p.add_argument("--url", required=True, help="server under test, http://host:port")
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                   help="green threads (= connections) per process (default 25)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load per target")
    p.add_argument("--rate", type=float, default=None,
                   help="target total requests/s (open loop); default: as fast as possible")
    p.add_argument("--timeout", type=float, default=10.0, help="per-request socket timeout (s)")
    p.add_argument("--out", default=None, help="report directory (default bench/out/<time>)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--cpus", default=None,
                   help="pin the load generator processes to these cores, e.g. 1 or 0,1")
    p.add_argument("--server-pid", type=int, default=None,
                   help="pid of the server under test, to report its CPU share")
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
    for name in ("processes", "concurrency", "duration", "timeout"):
        if getattr(args, name) <= 0:
            p.error("--%s must be positive" % name)
    if args.rate is not None and args.rate <= 0:
        p.error("--rate must be positive")
    args.cpus = sorted({int(c) for c in args.cpus.split(",")}) if args.cpus else None
    return args


def main(argv=None):
    args = parse_args(argv)
    from bench import report  # matplotlib is imported only when writing plots
    entries, skipped = load_log(args.log)
    if not entries:
        raise SystemExit("replay: no usable requests in %s" % args.log)
    out = args.out or os.path.join("bench", "out", time.strftime("replay-%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)
    print("replay: %d requests loaded from %s (%d lines skipped)" % (len(entries), args.log, skipped),
          file=sys.stderr)
    runs = {}
    hello = None
    load_before = list(os.getloadavg())
    try:
        base_url, base_pid = args.baseline_url, args.baseline_pid
        if args.baseline:
            hello, base_url = start_hello(args.baseline_cpu, out)
            base_pid = hello.pid
        if base_url:
            runs["baseline"] = measured_run(build_requests(entries, base_url), base_url, args,
                                            "baseline", base_pid)
    finally:
        if hello is not None:
            hello.stop()
    runs["target"] = measured_run(build_requests(entries, args.url), args.url, args,
                                  args.label, args.server_pid)
    meta = {"log": os.path.abspath(args.log), "log_entries": len(entries), "log_skipped": skipped,
            "url": args.url, "baseline_url": base_url, "command": "python -m bench.replay " + shlex.join(sys.argv[1:] if argv is None else argv),
            "notes": args.note, "cpu_count": os.cpu_count(),
            "loadavg_before": load_before, "loadavg_after": list(os.getloadavg())}
    summary = report.write_all(out, runs, meta)
    print(report.console_summary(summary), file=sys.stderr)
    print("report: %s" % os.path.join(out, "report.md"), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
