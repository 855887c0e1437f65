"""Operator mistakes and routine faults on one worker, as real processes.

Every start-up failure an operator can cause ends in one line naming what and where and
a non-zero exit status, never a traceback: a bad `--kestrel` list (a scheme, `;`, a port
out of range) names the flag or variable, a taken port, a spool directory that cannot be
written, an access log that cannot be opened.  A routes file refused on SIGHUP and still
on disk at the next restart does not stop the worker: it routes with the last good table
kept beside its spool, and says so; with no good table it refuses to start.  While
Kestrel is down the worker says it is spooling (within a second), and says when it stops
and when forwarding completes.

What it must not do: sleep to wait (everything polls with a deadline), or leave a process
running (every one is stopped by pid).
"""
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

from testkit.payloads import b64_json, write_routes
from testkit.procs import ROOT, Worker, free_port, ingest_argv, wait_until
from testkit.queues import read_all

LAUNCH = os.path.join(ROOT, "deploy", "launch.py")


def run(argv, env=None, timeout=20):
    """Run a command that must end by itself; a command still running fails the test."""
    try:
        return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail("%s still running after %ds (it should have refused to start):\n%s"
                    % (argv[3:], timeout, exc.stderr))


def serve(*args, env=None):
    return run(ingest_argv("serve", "--port", free_port(), *args, quiet=True), env=env)


def assert_one_line(done, status, *words):
    """Exit `status` (any non-zero when None), the last stderr line says what and where,
    and no traceback anywhere."""
    assert done.returncode != 0 if status is None else done.returncode == status, done
    assert "Traceback" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    for word in words:
        assert word in last, "%r not in %r" % (word, last)
    return last


@pytest.mark.parametrize("value, why", [
    ("http://127.0.0.1:22133", "no scheme"),
    ("127.0.0.1:22133;127.0.0.1:22134", "separate servers with ','"),
    ("127.0.0.1:99999", "port must be a number from 1 to 65535"),
    ("127.0.0.1", "host:port needed"),
])
def test_bad_kestrel_lists_are_refused_naming_the_flag(value, why):
    done = serve("--kestrel", value)
    assert_one_line(done, 2, "--kestrel", repr(value), why)
    env = dict(os.environ, INGEST_KESTREL=value)
    assert_one_line(serve(env=env), 2, "INGEST_KESTREL", why)


def test_bad_kestrel_lists_are_refused_by_every_command():
    done = run(ingest_argv("stats", "--kestrel", "http://127.0.0.1:22133", quiet=True))
    assert_one_line(done, None, "--kestrel", "no scheme")
    env = dict(os.environ, INGEST_KESTREL="a:1;b:2", INGEST_WORKERS="1")
    done = run([os.path.join(ROOT, ".venv", "bin", "python"), LAUNCH, "worker", "0"], env=env)
    assert_one_line(done, None, "INGEST_KESTREL", "separate servers with ','")
    assert_one_line(serve("--port", "99999"), 2, "--port", "1 to 65535")


def test_a_taken_port_is_one_line(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        done = run(ingest_argv("serve", "--port", port, "--spool", tmp_path / "spool",
                               quiet=True))
    assert_one_line(done, 1, "cannot listen on 127.0.0.1:%d" % port, "Address already in use")


def test_unwritable_paths_are_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert_one_line(serve("--spool", blocker / "spool"), 1, "spool directory",
                    str(blocker / "spool"), "Not a directory")
    assert_one_line(serve("--access-log", blocker / "access.log"), 1, "access log",
                    str(blocker / "access.log"), "Not a directory")


def test_a_read_only_spool_directory_is_one_line(tmp_path):
    """The directory exists but cannot be written (a read-only mount)."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        (mnt / "spool").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        done = serve("--spool", mnt / "spool")
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    assert_one_line(done, 1, "spool directory", "not writable", "Read-only file system")


# ---- routes: the last good table --------------------------------------------------------

def post_track(worker, token, insert_id):
    body = "data=" + b64_json({"event": "e", "properties": {"token": token,
                                                            "$insert_id": insert_id}})
    with urllib.request.urlopen(worker.url + "/track", body.encode(), timeout=10) as resp:
        return resp.read()


def test_a_refused_routes_file_on_restart_routes_with_the_last_good_table(
        tmp_path, queue_server, make_worker):
    routes = write_routes(tmp_path / "routes.json", {"tokens": {"acme": {"track": "acme_q"}}})
    spool = str(tmp_path / "spool")
    args = ["--routes", routes, "--spool", spool]
    first = make_worker(queue_server.address, extra=args)
    assert post_track(first, "acme", "a-1") == b"1"

    # A bad file, refused on SIGHUP, stays on disk.
    with open(routes, "w") as fh:
        fh.write('{"tokens": {"acme": {"track": "bad/name"}}}')
    first.proc.signal(signal.SIGHUP)
    wait_until(lambda: first.metric("ingest_routes_reload_failures_total") == 1.0,
               timeout=10, message="the refused reload")
    logged = [line for line in first.proc.output(20000).splitlines()
              if "reload failed" in line][0].split("keeping the last good table: ", 1)[1]
    # `ingest routes check` says the same thing, before anyone installs the file.
    check = run(ingest_argv("routes", "check", routes, quiet=True))
    assert check.returncode == 1 and check.stderr.strip().endswith(logged), check.stderr
    assert first.proc.stop() == 0

    # The restart keeps serving, with the last good table, and says so loudly.
    second = make_worker(queue_server.address, extra=args)
    assert "routing with the last good table" in second.proc.output()
    status, body = second.get("/ready")
    assert status == 200 and "routes file refused" in json.loads(body)["degraded"]
    assert second.metric("ingest_routes_stale") == 1.0
    assert post_track(second, "acme", "a-2") == b"1"
    landed = read_all(queue_server.address, "acme_q", 2)
    assert [r["properties"]["$insert_id"] for r in landed] == ["a-1", "a-2"]

    # A fixed file and a SIGHUP end the degraded state.
    write_routes(routes, {"tokens": {"acme": {"track": "acme_q2"}}})
    assert run(ingest_argv("routes", "check", routes, quiet=True)).returncode == 0
    second.proc.signal(signal.SIGHUP)
    wait_until(lambda: second.metric("ingest_routes_stale") == 0.0, timeout=10,
               message="the good reload")
    assert json.loads(second.get("/ready")[1]) == {"status": "ready"}


def test_a_bad_routes_file_without_a_last_good_table_refuses_to_start(tmp_path, queue_server):
    routes = tmp_path / "routes.json"
    routes.write_text('{"queues": {"track": 5}}')
    done = serve("--kestrel", queue_server.address, "--routes", routes,
                 "--spool", tmp_path / "fresh-spool")
    assert_one_line(done, 1, "bad routes file", "queues.track", "no last good routes table")


# ---- the spool, said out loud -----------------------------------------------------------

def test_the_worker_says_when_it_spools_and_when_forwarding_completes(
        tmp_path, queue_server, make_worker):
    worker = make_worker(queue_server.address, extra=[
        "--spool", tmp_path / "spool", "--kestrel-retry-ms", "100"])
    assert post_track(worker, "t", "s-0") == b"1"
    assert "spooling" not in worker.proc.output()

    queue_server.proc.kill()
    down = time.monotonic()
    sent = iter(range(1, 1000))

    def says_spooling():
        post_track(worker, "t", "s-%d" % next(sent))     # answered 1: spooled
        return "spooling: no Kestrel server stored the records" in worker.proc.output()

    wait_until(says_spooling, timeout=5, interval=0.05, message="the spooling line")
    took = time.monotonic() - down
    assert took < 1.0, "the spooling line came %.2f s after Kestrel went down" % took
    status, body = worker.get("/ready")
    assert status == 200 and json.loads(body)["degraded"].startswith("spooling")

    queue_server.start()
    wait_until(lambda: "forwarding complete" in worker.proc.output(), timeout=15,
               message="the forwarding-complete line")
    assert post_track(worker, "t", "s-last") == b"1"
    wait_until(lambda: "stopped spooling" in worker.proc.output(), timeout=5,
               message="the stopped-spooling line")
    out = worker.proc.output(20000)
    assert out.count("spooling: no Kestrel server") == 1, out    # rate-limited, not per request
    spooled = next(sent) - 1
    landed = read_all(queue_server.address, "events", spooled + 2, settle_ms=0)
    assert {r["properties"]["$insert_id"] for r in landed} == {
        "s-%d" % i for i in range(spooled + 1)} | {"s-last"}
