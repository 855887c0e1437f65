"""Operating the production tree: identity, rolling restarts, logs by policy, operator paths.

Each test starts the tree of supervisord.conf from a temporary directory on free ports
(testkit.tree), as tests/integration/test_deploy.py does:

- a foreign listener on a worker slot's port is not taken for a worker: nginx leaves the
  slot out and no client sees the foreign answers;
- deploy/rolling_restart.py restarts every slot under steady load through nginx with
  every answer counted: 0 non-2xx, 0 connection errors, and every acknowledged event on
  the queue;
- after /import calls with `api_key` in the query and in the form body and Basic
  credentials (right and wrong ones, some while a slot is down), no secret is in any log
  the tree wrote; X-Forwarded-For is recorded; access logs rotate; supervisord starts
  without a CRIT line other than the one documented in supervisord.conf;
- /metrics, /ready and /health are not answered through nginx's public port in any
  spelling, the status listener answers /ready, and the worker ports answer operator
  paths without CORS headers;
- a taken nginx port makes `make run` and nginx's launcher fail at once, in one line.

What it must not do: sleep to wait (everything polls with a deadline), touch ports or
directories it did not pick, or leave a process of a tree running.
"""
import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from testkit.load import Load
from testkit.payloads import b64_json, write_routes
from testkit.procs import ROOT, free_port, port_open, wait_until
from testkit.queues import read_until_empty
from testkit.rawhttp import request, roundtrip
from testkit.tree import LAUNCH, Tree, clean_env, free_port_run

TOKEN = "ops-token"
SECRET = "s3cr3t-0f-the-project"
WRONG = "n0t-the-s3cr3t"


def fetch(url, data=None, headers=None):
    req = urllib.request.Request(url, data=data, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


@pytest.fixture
def cleanup():
    trees = []
    yield trees.append
    for tree in trees:
        print(tree.logs())      # shown by pytest only when the test failed
        tree.cleanup()


# ---- 2: a foreign process on a slot port ------------------------------------------------

class Foreign(BaseHTTPRequestHandler):
    """Any other server: answers every GET with an HTML 501, and counts them."""

    hits = []

    def do_GET(self):
        Foreign.hits.append(self.path)
        body = b"<html><body><h1>501 Not Implemented</h1></body></html>"
        self.send_response(501)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.timeout(90)
def test_a_foreign_listener_on_a_slot_port_is_not_taken_for_a_worker(tmp_path, cleanup):
    tree = Tree(tmp_path, 2, INGEST_NGINX_WAIT_S=20)
    cleanup(tree)
    foreign = ThreadingHTTPServer(("127.0.0.1", tree.worker_port(1)), Foreign)
    threading.Thread(target=foreign.serve_forever, daemon=True).start()
    try:
        tree.proc.start()
        wait_until(lambda: tree.check_alive() and port_open("127.0.0.1", tree.http_port),
                   timeout=30, message="nginx listening")
        Foreign.hits.clear()
        answers = [fetch(tree.base_url + "/track?data=" + b64_json(
            {"event": "e", "properties": {"token": TOKEN, "n": i}})) for i in range(30)]
    finally:
        foreign.shutdown()
        foreign.server_close()
    assert [(status, body) for status, _, body in answers] == [(200, b"1")] * 30
    assert Foreign.hits == []
    wait_for_log_line(tree, "nginx.log", "port %d of worker slot 1 is held by something that"
                      " is not this tree's ingest worker (HTTP 501 text/html"
                      % tree.worker_port(1))
    # nginx only waited for slot 0: slot 1's worker may still be starting (or supervisord
    # not have copied its output to the log yet) when the requests above are done.
    wait_for_log_line(tree, "ingest-worker_01.log", "cannot listen on 127.0.0.1:%d: Address"
                      " already in use" % tree.worker_port(1))
    assert "Traceback" not in tree.log_text("ingest-worker_01.log")


def wait_for_log_line(tree, name, text, timeout=10):
    """Poll var/log/`name` until it holds `text`.  supervisord copies a program's output
    to its log file on its own schedule (and creates the file when it starts the
    program), so a line a program has written may not be in the file yet."""
    def written():
        try:
            return text in tree.log_text(name)
        except FileNotFoundError:
            return False                # the program not started yet
    wait_until(written, timeout=timeout, message="%r in var/log/%s" % (text, name))


# ---- 3: a rolling restart that drops nothing --------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(120)
def test_rolling_restart_under_load_answers_every_request(tmp_path, cleanup):
    tree = Tree(tmp_path, 2)
    cleanup(tree)
    tree.start()
    before = {n: i["pid"] for n, i in tree.infos().items() if n.startswith("ingest-worker")}
    load = Load("127.0.0.1", tree.http_port, threads=6, max_requests=10 ** 6, duration_s=90,
                pace_s=0.01, prefix="roll").start()
    try:
        wait_until(lambda: load.result.acked_count >= 200, timeout=20, message="warm-up")
        done = subprocess.run([sys.executable, os.path.join(ROOT, "deploy", "rolling_restart.py")],
                              cwd=tree.site, env=tree.env, capture_output=True, text=True,
                              timeout=90)
        assert done.returncode == 0, done.stdout + done.stderr
        after_restart = load.result.requests
        wait_until(lambda: load.result.requests >= after_restart + 200, timeout=20,
                   message="traffic after the restart")
    finally:
        result = load.stop()
    print("\n%s\n%s" % (done.stdout, result.summary()))
    after = {n: i["pid"] for n, i in tree.infos().items() if n.startswith("ingest-worker")}
    assert all(after[n] != before[n] for n in before), (before, after)
    assert "rolling restart done: 2 slots" in done.stdout
    assert result.statuses == {200: result.requests}, result.summary()
    landed = {r["properties"]["$insert_id"]
              for r in read_until_empty(tree.queue_address, "events", idle_ms=500,
                                        timeout_s=30)}
    assert set(result.acked) <= landed


# ---- 6, 7, 8: logs by policy, operator paths, start-up noise ----------------------------

def import_requests(tree):
    """/import with the secret in the query, in the form body, as Basic credentials, and
    a wrong one; returns the statuses."""
    url = tree.base_url + "/import"
    data = b64_json({"event": "imported", "properties": {
        "token": TOKEN, "time": 1700000000, "distinct_id": "d", "$insert_id": "imp-1"}})
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    basic = {"Authorization": "Basic " + base64.b64encode(
        ("%s:" % SECRET).encode()).decode(), **form}
    return [
        fetch(url + "?api_key=" + SECRET, urllib.parse.urlencode({"data": data}).encode(),
              form)[0],
        fetch(url, urllib.parse.urlencode({"api_key": SECRET, "data": data,
                                           "api_key_2": "x"}).encode(), form)[0],
        fetch(url + "?verbose=1", ("data=" + urllib.parse.quote(data)).encode(), basic)[0],
        fetch(url + "?api_key=" + WRONG + "&api_key=" + WRONG,
              ("api_key=%s&data=%s" % (WRONG, urllib.parse.quote(data))).encode(), form)[0],
    ]


def read_logs(tree):
    """{name: bytes} of every file under var/log, as one consistent snapshot.

    The tree's rotator renames the access logs past 4 KiB (FILE to FILE.1, FILE.1 to
    FILE.2, ...) within a second, at any moment: a rename between the listing and the
    reads makes a file vanish (FileNotFoundError) or its lines be read under two names or
    none.  The snapshot is taken again until every name is the same file after the reads
    as before them."""
    directory = tree.path("log")

    def files():
        return {n: os.stat(os.path.join(directory, n)).st_ino for n in os.listdir(directory)}

    def snapshot():
        try:
            before = files()
            texts = {}
            for name in before:
                with open(os.path.join(directory, name), "rb") as fh:
                    texts[name] = fh.read()
            return texts if files() == before else None
        except FileNotFoundError:
            return None                 # renamed this moment: take it again
    return wait_until(snapshot, timeout=10, message="var/log read between two rotations")


def assert_no_secret_in_any_log(tree):
    """No file under var/log holds the secret, the wrong secret or the Basic credentials."""
    basic = base64.b64encode(("%s:" % SECRET).encode())
    for name, text in sorted(read_logs(tree).items()):
        found = [s for s in (SECRET.encode(), WRONG.encode(), basic) if s in text]
        assert found == [], "%r in var/log/%s" % (found, name)


@pytest.fixture(scope="module")
def ops_tree(tmp_path_factory):
    """One tree for the log and operator-path checks: bodies captured at 100 %, the
    workers' access log in a file, and access logs rotated past 4 KiB."""
    tree = Tree(tmp_path_factory.mktemp("ops"), 2, INGEST_ACCESS_LOG_CAPTURE_PERCENT=100,
                INGEST_ACCESS_LOG="var/log/worker-access.log",
                INGEST_ACCESS_LOG_MAX_MB=0.004)
    write_routes(tree.routes, {"secrets": {TOKEN: SECRET}})
    try:
        yield tree.start()
    finally:
        print(tree.logs())
        tree.cleanup()


def test_operator_paths_are_not_public_and_carry_no_cors(ops_tree):
    tree = ops_tree
    for target in ("/metrics", "/ready", "/health", "/metrics/", "//metrics", "/%6detrics",
                   "/ready?x=1"):
        resp = roundtrip(tree.http_port, request("GET", target))
        assert resp.status == 404 and b"ingest_" not in resp.body, (target, resp)
    # The status listener answers /ready (a load balancer's health check), nothing else.
    status, _, body = fetch("http://127.0.0.1:%d/ready" % tree.status_port)
    assert (status, json.loads(body)["status"]) == (200, "ready")
    assert fetch("http://127.0.0.1:%d/metrics" % tree.status_port)[0] == 404
    # The worker ports answer them, without CORS headers whatever the Origin.
    evil = {"Origin": "https://evil.example"}
    for path in ("/metrics", "/ready", "/health"):
        status, headers, _ = fetch("http://127.0.0.1:%d%s" % (tree.worker_port(0), path),
                                   headers=evil)
        assert status == 200 and not [h for h in headers if h.lower().startswith("access-")]


@pytest.mark.timeout(90)
def test_no_log_holds_a_secret_and_access_logs_follow_the_policy(ops_tree):
    tree = ops_tree
    # /import with secrets everywhere, also while a slot is down (nginx's errors).
    assert import_requests(tree) == [200, 200, 200, 401]
    tree.ctl("stop", "ingest-worker:ingest-worker_01")
    assert import_requests(tree) == [200, 200, 200, 401]
    tree.ctl("start", "ingest-worker:ingest-worker_01")
    status, _, _ = fetch(tree.base_url + "/track?ip=1&data=" + b64_json(
        {"event": "xff", "properties": {"token": TOKEN}}),
        headers={"X-Forwarded-For": "198.51.100.23"})
    assert status == 200
    assert_no_secret_in_any_log(tree)

    # The access logs rotate by size, and both programs go on in the new files.
    def track(i):
        return fetch(tree.base_url + "/track?data=" + b64_json(
            {"event": "pad", "properties": {"token": TOKEN, "i": i}}))[0]

    assert [track(i) for i in range(40)] == [200] * 40
    for name in ("access.log", "worker-access.log"):
        log = tree.path("log", name)
        wait_until(lambda: os.path.exists(log + ".1"), timeout=10, message=name + " rotated")
    wait_until(lambda: track(-1) == 200 and all(
        size(tree.path("log", n)) > 0 for n in ("access.log", "worker-access.log")),
        timeout=10, message="nginx and the workers writing the new access logs")

    assert_no_secret_in_any_log(tree)    # again, rotated files and late writes included
    logs = read_logs(tree)
    lines = []
    for name, text in sorted(logs.items()):
        if name.startswith("access.log"):
            lines += [json.loads(line) for line in text.decode("utf-8").splitlines()]
    imports = [x for x in lines if x["path"] == "/import"]
    captured = [x["uri"] + "&" + x["body"] for x in imports]
    assert len(imports) == 8 and sum("api_key=REDACTED" in text for text in captured) == 6
    assert all(re.findall(r"api_key=([^&]*)", text) in ([], ["REDACTED"] * 3, ["REDACTED"])
               for text in captured), captured
    assert any(x["x_forwarded_for"] == "198.51.100.23" for x in lines)
    worker_lines = []
    for name, text in logs.items():
        if name.startswith("worker-access.log"):
            worker_lines += [json.loads(line) for line in text.decode("utf-8").splitlines()]
    assert any(x["forwarded_for"] == "198.51.100.23, 127.0.0.1" and x["ip"] == "198.51.100.23"
               for x in worker_lines)

    crit = [line for line in tree.log_text("supervisord.log").splitlines() if " CRIT " in line]
    assert crit == [line for line in crit if "'unix_http_server' running without any HTTP"
                    " authentication checking" in line] and len(crit) <= 1, crit


def size(path):
    """The file's size; 0 while it is not there (not created yet, or renamed by the
    rotator this moment and not yet reopened)."""
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


# ---- 5: a taken nginx port fails at once --------------------------------------------------

def make_run(env, timeout=15):
    """`make run` in the checkout; one that does not end is stopped with its whole process
    group (make, supervisord; supervisord stops its programs) and fails the test."""
    proc = subprocess.Popen(["make", "-s", "-o", ".venv/.runtime", "-o", "nginx", "run"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.communicate(timeout=30)
        pytest.fail("`make run` kept running with its nginx port taken")
    return proc.returncode, err


def test_a_taken_nginx_port_fails_make_run_and_the_launcher_at_once(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        env = clean_env(INGEST_PORT=port, INGEST_LISTEN="127.0.0.1", INGEST_WORKERS=1,
                        INGEST_STATUS_PORT=free_port(), INGEST_QUEUE_PORT=free_port(),
                        INGEST_WORKER_BASE_PORT=free_port_run(1))
        # `make run` itself (its environment rules not remade): it must end, loudly.
        code, err = make_run(env)
        assert code != 0
        assert re.search(r"preflight: 127\.0\.0\.1:%d \(nginx, INGEST_PORT\) cannot be used:"
                         r" Address already in use" % port, err), err
        # What supervisord runs: the launcher exits at once, so it is never RUNNING.
        launcher = subprocess.run([sys.executable, LAUNCH, "nginx"], cwd=str(tmp_path),
                                  env=env, capture_output=True, text=True, timeout=15)
    assert launcher.returncode == 1 and "Traceback" not in launcher.stderr
    assert launcher.stderr.strip().splitlines() == [
        "launch: nginx cannot start: 127.0.0.1:%d (nginx, INGEST_PORT) cannot be used: Address"
        " already in use; stop what holds it or choose another INGEST_PORT" % port]
