"""Slow clients against a real worker: 420 connections trickling their requests a few bytes
at a time over about 3 s, while ordinary /track requests on other connections must each
be answered within a second.

The trickle runs in this (not monkey-patched) process from one thread with a paced loop;
the ordinary requests run in a second thread and record their latency.  Only 127.0.0.1
is contacted; every socket is closed and the worker is stopped by pid afterwards.
"""
import resource
import threading
import time

import pytest

from testkit.payloads import b64
from testkit.procs import open_fds, wait_until
from testkit.rawhttp import assert_clean, connect, read_response, roundtrip

SLOW = 420                      # trickling connections
TRICKLE_S = 3.0                 # each request takes about this long to arrive
TICK_S = 0.05                   # pacing of the trickle loop
PROBE_EVERY_S = 0.1             # one ordinary request this often during the trickle
PROBE_LIMIT_S = 1.0


def _request(i, close):
    data = b64('{"event":"slow %d","properties":{"token":"slow-token","n":%d}}' % (i, i))
    return ("GET /track?data=%s HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: slowpoke/%d\r\n"
            "Connection: %s\r\n\r\n" % (data, i, "close" if close else "keep-alive")).encode()


@pytest.fixture
def enough_fds():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = SLOW + 200
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= needed
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class Prober(threading.Thread):
    """Ordinary requests (fresh connection each) while the trickle runs; keeps latencies."""

    def __init__(self, port, stop):
        super().__init__(daemon=True)
        self.port, self.stop, self.latencies, self.errors = port, stop, [], []

    def run(self):
        i = 0
        while not self.stop.is_set():
            i += 1
            started = time.monotonic()
            try:
                resp = roundtrip(self.port, _request(100000 + i, close=True))
                assert (resp.status, resp.body) == (200, b"1"), resp
                self.latencies.append(time.monotonic() - started)
            except Exception as exc:      # reported by the test, not lost in the thread
                self.errors.append(repr(exc))
            self.stop.wait(PROBE_EVERY_S)


def _trickle(socks, requests):
    """Send each request in slices, all connections in step, over about TRICKLE_S."""
    ticks = int(TRICKLE_S / TICK_S)
    longest = max(len(r) for r in requests)
    step = -(-longest // ticks)           # ceil: bytes per connection per tick
    started = time.monotonic()
    for tick in range(ticks + 1):
        lo, hi = tick * step, (tick + 1) * step
        for sock, raw in zip(socks, requests):
            if lo < len(raw):
                sock.sendall(raw[lo:hi])
        # pacing, not waiting for a condition: the next slice is due at this time
        delay = started + (tick + 1) * TICK_S - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    return time.monotonic() - started


def test_slow_clients_do_not_starve_ordinary_requests(worker, enough_fds):
    requests = [_request(i, close=True) for i in range(SLOW)]
    socks = []
    stop = threading.Event()
    prober = Prober(worker.port, stop)
    try:
        for _ in range(SLOW):
            socks.append(connect(worker.port, timeout=10))
        prober.start()
        took = _trickle(socks, requests)
        stop.set()
        prober.join(timeout=10)
        assert not prober.errors, prober.errors[:5]
        assert len(prober.latencies) >= 15, prober.latencies
        assert max(prober.latencies) < PROBE_LIMIT_S, sorted(prober.latencies)[-5:]
        assert TRICKLE_S - 0.5 < took < TRICKLE_S + 3, took
        # The trickled requests were complete at the end: each gets its answer.
        for sock in socks:
            resp, _ = read_response(sock)
            assert_clean(resp, 200)
            assert resp.body == b"1"
    finally:
        stop.set()
        for sock in socks:
            sock.close()
    assert worker.proc.alive(), worker.proc.output()
    resp = roundtrip(worker.port, _request(-1, close=True))
    assert (resp.status, resp.body) == (200, b"1")


def test_abandoned_half_requests_are_released(worker, enough_fds):
    """420 connections each send half a request and vanish; the worker stays up, answers
    at once, and its descriptors come back to where they were."""
    roundtrip(worker.port, _request(0, close=True))   # warm up: Kestrel connection, pools
    before = open_fds(worker.proc.pid)
    socks = [connect(worker.port, timeout=10) for _ in range(SLOW)]
    try:
        for i, sock in enumerate(socks):
            raw = _request(i, close=True)
            sock.sendall(raw[:len(raw) // 2])
        # Slack of 2: the warm-up connection's descriptor may still have been open when
        # `before` was read, and closes meanwhile.
        wait_until(lambda: open_fds(worker.proc.pid) >= before + SLOW - 2, timeout=10,
                   message="the worker to accept every connection")
        started = time.monotonic()
        resp = roundtrip(worker.port, _request(-2, close=True))
        assert (resp.status, resp.body) == (200, b"1")
        assert time.monotonic() - started < PROBE_LIMIT_S
    finally:
        for sock in socks:
            sock.close()
    wait_until(lambda: open_fds(worker.proc.pid) <= before + 2, timeout=10,
               message="the worker to close the abandoned connections")
    assert worker.proc.alive(), worker.proc.output()
