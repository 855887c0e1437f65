"""No acknowledged record is lost to a bad byte, a stale file or a full disk, and no small
request can exhaust a worker: the dirty faults, against real processes.

1. a flipped length byte in a spool segment loses that record only (kept aside);
2. a stale `.pos` left by a crash does not apply to the next outage's segments;
3. small gzip requests that inflate to megabytes of JSON do not exhaust memory;
4. bodies trickled a byte at a time do not block other POSTs, and time out;
5. out of file descriptors, the worker keeps serving and does not exit;
6. /ready answers 503 while the spool's disk is full and Kestrel is down;
7. a record every Kestrel server refuses goes to a dead-letter file; the rest drains.

Settings a test needs are passed as INGEST_* environment variables where possible, so
that the same test runs (and fails for the reason it names) against a worker that does
not know the setting.  Waits poll against a deadline; every process is stopped by pid.
"""
import gzip
import http.client
import json
import os
import resource
import subprocess
import threading
import time


from testkit.load import Load, track_body, track_query
from testkit.procs import (QueueServer, Worker, fill_disk as fill, ingest_argv, open_fds,
                           peak_rss_kib, rss_kib, wait_until)
from testkit.rawhttp import closed_by_peer, connect, read_response, request

from .test_no_loss import (FAST, check_no_loss, collect, http_get, procs,  # noqa: F401
                           segments, start_queue)

MiB = 1024 * 1024
SYNC, OLD_HEADER, NEW_HEADER = b"\xfe\xffSF", 10, 18   # the two frame formats' headers


def queue_server(procs, tmp_path, **kw):
    return start_queue(procs, tmp_path, sync_ms=100, **kw)


def worker(procs, tmp_path, kestrel, spool_dir=None, extra=(), env=None, name="worker"):
    args = (["--spool", spool_dir] if spool_dir else []) + FAST + list(extra)
    w = Worker(tmp_path, kestrel, extra=args, name=name,
               env=dict(os.environ, **(env or {})))
    procs.append(w.proc)
    return w.start()


def forward(spool_dir, address, *extra):
    return subprocess.run(ingest_argv("spool", "forward", spool_dir, "--kestrel", address,
                                      *extra), capture_output=True, timeout=60)


def read(path):
    with open(path, "rb") as fh:
        return fh.read()


def length_high_byte(data, marker, queue=b"events"):
    """Offset of the high byte of the payload length of the frame whose payload holds
    `marker`, in either frame format (format 2 starts its frames with a sync marker)."""
    payload = data.rindex(b"{", 0, data.index(marker))
    while data[payload - len(queue):payload] != queue:
        payload = data.rindex(b"{", 0, payload)
    start = payload - len(queue)
    if data[start - NEW_HEADER:start - NEW_HEADER + 4] == SYNC:
        return start - NEW_HEADER + 4 + 3
    return start - OLD_HEADER + 3


# ---- 1. a flipped length byte --------------------------------------------------------------

def test_a_flipped_length_byte_loses_one_record_not_the_rest(tmp_path, procs):
    queue = queue_server(procs, tmp_path)                 # down while the worker spools
    spool_dir = str(tmp_path / "spool")
    w = worker(procs, tmp_path, queue.address, spool_dir)
    result = Load(w.host, w.port, threads=1, max_requests=30, batch=10, prefix="b").run()
    assert result.acked_count == 300, result.summary()
    assert w.proc.stop() == 0
    victim = result.acked[100]
    (path,) = [p for p in (os.path.join(spool_dir, n) for n in segments(spool_dir))
               if victim.encode() in read(p)]
    with open(path, "r+b") as fh:
        data = fh.read()
        at = length_high_byte(data, victim.encode())
        fh.seek(at)
        fh.write(bytes([data[at] ^ 0x80]))
    queue.start()
    run = forward(spool_dir, queue.address)
    assert run.returncode == 0, run.stderr.decode()
    landed = collect(queue.address, [i for i in result.acked if i != victim])
    lost = set(result.acked) - set(landed)
    print("\nflipped length byte: acknowledged=300 landed=%d lost=%d" % (len(set(landed)),
                                                                       len(lost)))
    assert lost == {victim}, "lost %d acknowledged records: %s" % (len(lost), sorted(lost)[:5])
    kept = [n for n in os.listdir(spool_dir) if n.endswith(".damaged")]
    assert len(kept) == 1, os.listdir(spool_dir)
    with open(os.path.join(spool_dir, kept[0]), "rb") as fh:
        assert victim.encode() in fh.read()               # kept for a person, not deleted


# ---- 2. a stale .pos -----------------------------------------------------------------------

def test_a_stale_progress_file_does_not_apply_to_the_next_outage(tmp_path, procs):
    queue = queue_server(procs, tmp_path)                 # down: the outage
    spool_dir = str(tmp_path / "spool")
    os.makedirs(spool_dir)
    # What `spool forward` leaves when killed between deleting a forwarded segment 2
    # and deleting its progress file: the .pos alone, in the old format's shape.
    with open(os.path.join(spool_dir, "spool-%016d.seg.pos" % 2), "w") as fh:
        fh.write("5000")
    w = worker(procs, tmp_path, queue.address, spool_dir)
    result = Load(w.host, w.port, threads=1, max_requests=150, batch=10, prefix="s").run()
    assert result.acked_count == 1500, result.summary()
    queue.start()
    landed = collect(queue.address, result.acked, timeout_s=20)
    check_no_loss("stale .pos", result, landed)
    wait_until(lambda: not segments(spool_dir), timeout=10, message="spool forwarded")


# ---- 3. small gzip requests, megabytes of JSON ---------------------------------------------

def issue_shaped_gzip(records, properties):
    """A gzip /track body of `records` events with `properties` properties each: ~40 KB
    on the wire for megabytes of JSON (the values repeat)."""
    props = {"p%03d" % j: "v%05d" % j for j in range(properties)}
    events = [{"event": "e", "properties": dict(props, token="t", distinct_id="d%d" % i)}
              for i in range(records)]
    return gzip.compress(b"data=" + json.dumps(events, separators=(",", ":")).encode())


def test_small_gzip_requests_cannot_exhaust_a_workers_memory(tmp_path, procs):
    queue = queue_server(procs, tmp_path).start()
    w = worker(procs, tmp_path, queue.address)
    body = issue_shaped_gzip(2000, 120)                  # ~26 KB -> 3.9 MB of JSON
    assert len(body) < 40_000
    before = rss_kib(w.proc.pid)
    answers = []

    def send():
        conn = http.client.HTTPConnection(w.host, w.port, timeout=60)
        try:
            conn.request("POST", "/track", body=body,
                         headers={"Content-Type": "text/plain", "Content-Encoding": "gzip"})
            resp = conn.getresponse()
            answers.append((resp.status, resp.read(), resp.getheader("Retry-After")))
        except OSError as exc:
            answers.append(("conn-error", repr(exc), None))
        finally:
            conn.close()

    senders = [threading.Thread(target=send) for _ in range(24)]
    for t in senders:
        t.start()
    for t in senders:
        t.join(90)
    peak = peak_rss_kib(w.proc.pid)
    statuses = sorted(set((a[0], a[2]) for a in answers), key=str)
    print("\n24 gzip requests of %d bytes: peak RSS %d MB (from %d MB); answers %s"
          % (len(body), peak // 1024, before // 1024, statuses))
    assert peak - before < 400 * 1024, "peak RSS grew by %d MB" % ((peak - before) // 1024)
    assert w.proc.alive() and len(answers) == 24
    assert all(a[:2] == (200, b"1") or (a[0] == 503 and a[2]) for a in answers), statuses
    assert any(a[0] == 200 for a in answers)
    wait_until(lambda: rss_kib(w.proc.pid) < before + 60 * 1024, timeout=5,
               message="RSS back near its start within 5 s of the last answer")


# ---- 4. trickled bodies --------------------------------------------------------------------

def test_trickled_bodies_hold_no_budget_and_time_out(tmp_path, procs):
    queue = queue_server(procs, tmp_path).start()
    w = worker(procs, tmp_path, queue.address, env={
        "INGEST_MAX_BODY_BYTES": str(MiB), "INGEST_MAX_BODY_BYTES_IN_FLIGHT": str(2 * MiB),
        "INGEST_BODY_TIMEOUT_S": "3"})
    head = ("POST /track HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
            "Content-Length: %d\r\n\r\n" % MiB).encode()
    slow = [connect(w.port, timeout=10) for _ in range(3)]
    try:
        for sock in slow:
            sock.sendall(head + b"d")
        started = time.monotonic()
        # While they trickle (a byte every 0.5 s), ordinary POSTs are served at once.
        for n in range(4):
            for sock in slow:
                try:
                    sock.sendall(b"a")
                except OSError:
                    pass
            status, _, body = post_track(w, ["ok-%d" % n])
            assert (status, body) == (200, b"1"), (status, body)
            time.sleep(0.5)    # the trickle's pace (the fault itself), not a wait
        # Each trickled body gets 408 once its whole-body deadline (3 s) has passed.
        for sock in slow:
            resp, _ = read_response(sock)
            assert resp.status == 408, resp
            waited, rest = closed_by_peer(sock, timeout=5)
            assert rest == b"" and waited < 2, (waited, rest)       # and closed
        assert time.monotonic() - started < 8
    finally:
        for sock in slow:
            sock.close()


def post_track(w, ids):
    conn = http.client.HTTPConnection(w.host, w.port, timeout=5)
    try:
        conn.request("POST", "/track", body=track_body(ids),
                     headers={"Content-Type": "application/x-www-form-urlencoded"})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


# ---- 5. out of file descriptors ------------------------------------------------------------

def test_out_of_file_descriptors_the_worker_keeps_serving(tmp_path, procs):
    queue = queue_server(procs, tmp_path).start()
    w = worker(procs, tmp_path, queue.address, extra=["--keepalive-idle-s", "30"])
    pid = w.proc.pid
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (open_fds(pid) + 3, hard))
    health = request("GET", "/health", close=False)
    held = []
    try:
        for _ in range(8):                  # more than it has descriptors for
            sock = connect(w.port, timeout=10)
            sock.sendall(health)
            held.append(sock)
        served = [read_response(sock)[0].status for sock in held[:3]]
        assert served == [200] * 3
        wait_until(lambda: b"Too many open files" in read(w.proc.err_path),
                   timeout=5, message="a log line about the descriptor limit")
        for sock in held[:3]:               # free descriptors: the waiting ones get in
            sock.close()
        for sock in held[3:6]:
            assert read_response(sock)[0].status == 200
        assert w.proc.alive(), "worker exited with %s:\n%s" % (w.proc.popen.poll(),
                                                              w.proc.output())
    finally:
        for sock in held:
            sock.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    status, _, body = http_get(w.host, w.port, "/metrics")
    assert status == 200 and b"ingest_accept_errors_total" in body
    assert http_get(w.host, w.port, "/track?" + track_query(["after"]))[2] == b"1"
    assert w.proc.alive()


# ---- 6. /ready on a full disk (small_disk: tests/integration/conftest.py) ------------------

def test_ready_is_503_while_the_spool_disk_is_full_and_kestrel_down(tmp_path, procs, small_disk):
    queue = queue_server(procs, tmp_path)                 # never started: Kestrel is down
    spool_dir = os.path.join(small_disk, "spool")
    w = worker(procs, tmp_path, queue.address, spool_dir)
    filler = fill(small_disk)
    status, headers, body = http_get(w.host, w.port, "/track?" + track_query(["full"]))
    assert status == 503 and headers.get("Retry-After"), (status, body)
    status, _, body = http_get(w.host, w.port, "/ready")
    assert status == 503 and b"No space left on device" in body, (status, body)
    os.unlink(filler)
    wait_until(lambda: http_get(w.host, w.port, "/ready")[0] == 200, timeout=5,
               message="/ready once the disk has room again")
    assert http_get(w.host, w.port, "/track?" + track_query(["room"]))[2] == b"1"


# ---- 7. a record no server will take -----------------------------------------------------

def test_a_record_every_server_refuses_does_not_block_the_spool(tmp_path, procs):
    queue = queue_server(procs, tmp_path, extra=["--max-item-bytes", "2000"])  # down at first
    spool_dir = str(tmp_path / "spool")
    w = worker(procs, tmp_path, queue.address, spool_dir)
    first = Load(w.host, w.port, threads=1, max_requests=1, batch=10, prefix="a").run()
    big = post_big(w, "big-one")
    rest = Load(w.host, w.port, threads=1, max_requests=150, batch=10, prefix="z").run()
    assert (first.acked_count, big, rest.acked_count) == (10, 200, 1500)
    queue.start()
    acked = first.acked + rest.acked
    landed = collect(queue.address, acked, timeout_s=20)
    missing = set(acked) - set(landed)
    print("\nrefused record: acknowledged=%d landed=%d missing=%d"
          % (len(acked) + 1, len(set(landed)), len(missing)))
    assert not missing, "%d acknowledged records never drained" % len(missing)
    wait_until(lambda: [n for n in os.listdir(spool_dir) if n.endswith(".dead")], timeout=10,
               message="a dead-letter file")
    dead = [n for n in os.listdir(spool_dir) if n.endswith(".dead")]
    with open(os.path.join(spool_dir, dead[0]), "rb") as fh:
        assert b"big-one" in fh.read()
    assert b"ingest_spool_dead_letters_total 1.0" in http_get(w.host, w.port, "/metrics")[2]


def test_spool_forward_dead_letters_them_and_sends_them_again_later(tmp_path, procs):
    spool_dir = str(tmp_path / "spool")
    down = QueueServer(tmp_path, name="never")           # a port nothing listens on
    w = worker(procs, tmp_path, down.address, spool_dir)
    assert post_big(w, "big-two") == 200
    result = Load(w.host, w.port, threads=1, max_requests=110, batch=10, prefix="f").run()
    assert result.acked_count == 1100
    assert w.proc.stop() == 0
    limited = queue_server(procs, tmp_path, name="limited",
                           extra=["--max-item-bytes", "2000"]).start()
    run = forward(spool_dir, limited.address)
    assert run.returncode == 0, run.stderr.decode()
    assert b"1 dead letters" in run.stdout, run.stdout
    check_no_loss("spool forward, refused record", result, collect(limited.address, result.acked))
    roomy = queue_server(procs, tmp_path, name="roomy").start()
    run = forward(spool_dir, roomy.address, "--dead-letters")
    assert run.returncode == 0, run.stderr.decode()
    (item,) = collect(roomy.address, ["big-two"])
    assert item == "big-two"
    assert not [n for n in os.listdir(spool_dir) if n.endswith(".dead")]


def post_big(w, insert_id):
    """A /track event of ~5 KB: over the queue's item limit, under the worker's."""
    status, _, body = post_track_query(w, track_query([insert_id], pad=5000))
    return status if body == b"1" else (status, body)


def post_track_query(w, query):
    conn = http.client.HTTPConnection(w.host, w.port, timeout=10)
    try:
        conn.request("POST", "/track", body=query.encode(),
                     headers={"Content-Type": "application/x-www-form-urlencoded"})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()
