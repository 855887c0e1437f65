"""The production tree end to end: supervisord.conf + deploy/nginx.conf + N workers + queue.

What it is for: proving the shipped configuration works as one piece.  supervisord is
started from a temporary directory (so every path under var/ lands there) with INGEST_*
variables pointing nginx, the workers and the bundled queue at free loopback ports, so a
real `make run` on the same machine is never touched.  Traffic goes through nginx with the
official Python SDK; one worker is SIGKILLed in the middle; nginx must retry so that no
request fails, supervisord must restart the worker, and every acknowledged event must be
on the queue.  Then the documented `supervisorctl signal HUP ingest-worker:*` must make
every worker reload its routes without restarting, stopping supervisord must leave no
process of the tree behind, and nginx's access log (capture at 100 %) must hold every
request with its body (bench/ replays it).

What it must not do: sleep to wait (everything polls with a deadline), touch ports or
directories it did not pick, or signal any process that is not part of the tree it
started.
"""
import grp
import itertools
import json
import os
import pwd
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request

import mixpanel
import pytest

from ingest.kestrel import Client
from testkit.payloads import b64_json, write_routes
from testkit.procs import Proc, free_port, port_open, wait_until
from testkit.queues import read_until_empty
from testkit.rawhttp import roundtrip
from testkit.tree import LAUNCH, NGINX, Tree, child_pids, clean_env, free_port_run, pid_alive

WORKERS = 3          # not the core count (2 here): numprocs must follow INGEST_WORKERS
SENDERS = 4          # concurrent SDK clients, so requests are in flight at the kill
TOKEN = "deploy-test-token"


@pytest.fixture
def tree(tmp_path):
    t = Tree(tmp_path, WORKERS, INGEST_ACCESS_LOG_CAPTURE_PERCENT=100)
    yield t
    print(t.logs())  # shown by pytest only when the test failed
    t.cleanup()


def track_body(token, insert_id, **props):
    record = {"event": "deploy test", "properties": dict(
        props, token=token, distinct_id="d", **{"$insert_id": insert_id})}
    return {"data": b64_json(record, compact=False)}


def post_form(url, fields, headers=None):
    body = urllib.parse.urlencode(fields).encode()
    req = urllib.request.Request(url, data=body, headers=dict(headers or {}))
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, resp.read()


class Senders:
    """SENDERS threads, each an SDK client with its own Consumer, tracking unique events."""

    def __init__(self, base_url):
        self.base_url = base_url
        self.lock = threading.Lock()
        self.acked = []
        self.failed = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(n,), daemon=True)
                        for n in range(SENDERS)]

    def _client(self):
        b = self.base_url
        # http:// URLs: the SDK's own retries are mounted for https:// only, so a
        # failure here is one nginx did not absorb.
        consumer = mixpanel.Consumer(events_url=b + "/track", people_url=b + "/engage",
                                     groups_url=b + "/groups", import_url=b + "/import",
                                     request_timeout=10, retry_limit=0)
        return mixpanel.Mixpanel(TOKEN, consumer=consumer)

    def _run(self, n):
        mp = self._client()
        i = 0
        while not self.stop.is_set():
            insert_id = "deploy-%d-%06d" % (n, i)
            i += 1
            try:
                mp.track("user-%d" % n, "deploy test", {"$insert_id": insert_id, "n": i})
            except mixpanel.MixpanelException as exc:
                with self.lock:
                    self.failed.append((insert_id, str(exc)))
                continue
            with self.lock:
                self.acked.append(insert_id)

    def count(self):
        with self.lock:
            return len(self.acked)

    def start(self):
        for t in self.threads:
            t.start()

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=15)
        assert not any(t.is_alive() for t in self.threads), "a sender thread hung"


def probe_xff_and_long_url(tree):
    """Two requests the defaults of nginx would break; returns their insert_ids."""
    record = {"event": "probe", "properties": {"token": TOKEN, "distinct_id": "p",
                                               "$insert_id": "deploy-probe-xff"}}
    data = b64_json(record, compact=False)
    status, body = post_form(tree.base_url + "/track?ip=1", {"data": data},
                             headers={"X-Forwarded-For": "203.0.113.7"})
    assert (status, body.strip()) == (200, b"1")
    # A 30 kB URL: nginx's default 8 kB header buffer would answer 414.
    record["properties"].update({"$insert_id": "deploy-probe-long", "pad": "x" * 20000})
    query = urllib.parse.urlencode({"data": b64_json(record, compact=False)})
    with urllib.request.urlopen(tree.base_url + "/track?" + query, timeout=10) as resp:
        assert (resp.status, resp.read().strip()) == (200, b"1")
    return {"deploy-probe-xff", "deploy-probe-long"}


def reload_routes_everywhere(tree):
    """Reroute one token, SIGHUP the workers as the docs say, and see every one obey."""
    before = {n: i["pid"] for n, i in tree.infos().items() if n.startswith("ingest-worker:")}
    write_routes(tree.routes, {"tokens": {"deploy-rerouted": {"track": "deploy_rerouted"}}})
    out = tree.ctl("signal", "HUP", "ingest-worker:*")
    assert out.count(": signalled") == tree.workers, out
    with Client([tree.queue_address]) as client:
        for slot in range(tree.workers):
            # Straight to each worker's own port, until its table has the new route; a
            # record sent before the reload lands on `events`, already checked above.
            url = "http://127.0.0.1:%d/track" % (tree.worker_base + slot)
            ids = ("hup-%d-%d" % (slot, n) for n in itertools.count())

            def rerouted():
                insert_id = next(ids)
                post_form(url, track_body("deploy-rerouted", insert_id))
                item = client.get("deploy_rerouted", timeout=200)
                if item is None:
                    return False  # not reloaded yet: this one went to `events`
                assert json.loads(item)["properties"]["$insert_id"] == insert_id
                return True

            wait_until(rerouted, timeout=10, message="worker slot %d reloading routes" % slot)
        # Through nginx (and the browser SDK's trailing-slash path) it now always reroutes.
        status, _ = post_form(tree.base_url + "/track/", track_body("deploy-rerouted", "hup-n"))
        assert status == 200
        item = client.get("deploy_rerouted", timeout=2000)
        assert item is not None and json.loads(item)["properties"]["$insert_id"] == "hup-n"
    after = {n: i["pid"] for n, i in tree.infos().items() if n.startswith("ingest-worker:")}
    assert after == before, "SIGHUP must reload, not restart: %r -> %r" % (before, after)


def rotate_access_log(tree):
    """The documented rotation: move the file, USR1 to nginx, and it writes a new one."""
    log = tree.path("log", "access.log")
    os.rename(log, log + ".1")
    assert "nginx: signalled" in tree.ctl("signal", "USR1", "nginx")

    def logging_to_new_file():
        # The master creates the file at once; its worker processes switch a moment later.
        # (/ready is not public: nginx answers 404 for it, and logs that.)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(tree.base_url + "/ready", timeout=5)
        assert refused.value.code == 404
        return os.path.exists(log) and os.path.getsize(log) > 0

    wait_until(logging_to_new_file, timeout=5, message="nginx writing the new access.log")
    return log + ".1"


def kill_worker_and_wait_restart(tree, name="ingest-worker:ingest-worker_00"):
    old = tree.infos()[name]["pid"]
    os.kill(old, signal.SIGKILL)

    def restarted():
        info = tree.infos()[name]
        return info["statename"] == "RUNNING" and info["pid"] not in (0, old) and info["pid"]

    new = wait_until(restarted, timeout=15, message="supervisord restarting %s" % name)
    return old, new


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_tree_survives_a_killed_worker_and_stops_cleanly(tree):
    tree.start()
    probes = probe_xff_and_long_url(tree)

    senders = Senders(tree.base_url)
    senders.start()
    try:
        wait_until(lambda: senders.count() >= 150, timeout=20, message="150 acked events")
        old, new = kill_worker_and_wait_restart(tree)
        wait_until(lambda: port_open("127.0.0.1", tree.worker_base), timeout=10,
                   message="restarted worker listening")
        after_restart = senders.count()
        wait_until(lambda: senders.count() >= after_restart + 150, timeout=20,
                   message="150 more acked events after the restart")
    finally:
        senders.finish()
    assert senders.failed == [], "requests failed despite nginx retries: %r" % senders.failed[:5]
    assert old != new

    # Every acknowledged event is on the queue (duplicates allowed: at-least-once).
    records = read_until_empty(tree.queue_address, "events", idle_ms=500, timeout_s=30)
    landed = [r["properties"].get("$insert_id") for r in records]
    missing = (set(senders.acked) | probes) - set(landed)
    assert not missing, "%d acknowledged events missing, e.g. %r" % (len(missing),
                                                                    sorted(missing)[:5])
    assert set(landed) <= set(senders.acked) | probes, "events nobody sent landed"
    by_id = {r["properties"]["$insert_id"]: r for r in records}
    assert by_id["deploy-probe-xff"]["properties"]["ip"] == "203.0.113.7"

    rotated = rotate_access_log(tree)
    reload_routes_everywhere(tree)  # its request through nginx goes to the new access.log

    # Stop the whole tree the way Ctrl-C / SIGTERM does; nothing of it may survive.
    pids = set(tree.nginx_pids()) | {i["pid"] for i in tree.infos().values()} | {tree.proc.pid}
    assert len(pids) >= WORKERS + 4  # supervisord, queue, workers, nginx master + worker(s)
    assert tree.stop() == 0, tree.proc.output()
    wait_until(lambda: not any(pid_alive(p) for p in pids | tree.seen_pids), timeout=10,
               message="every process of the tree gone")

    # The replay log has one line per request nginx answered, with the POST bodies.
    with open(rotated, encoding="utf-8") as fh:
        lines = [json.loads(line) for line in fh]
    with open(tree.path("log", "access.log"), encoding="utf-8") as fh:
        after = [json.loads(line) for line in fh]
    assert after and all(x["path"] in ("/ready", "/track/") for x in after), after
    posts = [x for x in lines if x["method"] == "POST" and x["uri"] == "/track"]
    assert len(posts) == len(senders.acked)  # the probes went to /track?...
    assert all(x["status"] == 200 and x["body"].startswith("data=") for x in posts)
    assert any("%22deploy-0-000000%22" in x["body"] for x in posts)


def render(tmp_path, workers, **env):
    """Run `launch.py render-nginx` (render + `nginx -t`) and return the rendered text."""
    env = clean_env(INGEST_WORKERS=workers, INGEST_NGINX=NGINX, **env)
    done = subprocess.run([sys.executable, LAUNCH, "render-nginx"], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == os.path.join(str(tmp_path), "var", "nginx", "nginx.conf")
    with open(done.stdout.strip(), encoding="utf-8") as fh:
        return fh.read()


@pytest.mark.parametrize("workers", [1, 2, 7, 64])
def test_rendered_nginx_conf_lists_every_slot_and_passes_nginx_t(tmp_path, workers):
    text = render(tmp_path, workers, INGEST_WORKER_BASE_PORT=9100, INGEST_PORT=18080)
    servers = [line.split()[1] for line in text.splitlines()
               if line.strip().startswith("server 127.0.0.1:")]
    assert servers == ["127.0.0.1:%d" % (9100 + i) for i in range(workers)]
    assert "listen 0.0.0.0:18080 " in text


def test_rendered_nginx_conf_follows_the_worker_limits(tmp_path):
    text = render(tmp_path, 2, INGEST_MAX_BODY_BYTES=2000000,
                  INGEST_MAX_REQUEST_LINE_BYTES=32768, INGEST_LISTEN="127.0.0.1")
    assert "client_max_body_size 2000000;" in text
    assert "client_body_buffer_size 2000000;" in text
    assert "large_client_header_buffers 4 32768;" in text
    assert "listen 127.0.0.1:8080 " in text
    assert "@@" not in text
    # Started as root, nginx's workers run as var/'s owner, so they can reopen the logs.
    users = re.findall(r"(?m)^user (\S+) (\S+);$", text)
    assert users == ([(pwd.getpwuid(os.stat(tmp_path).st_uid).pw_name,
                       grp.getgrgid(os.stat(tmp_path).st_gid).gr_name)]
                     if os.geteuid() == 0 else [])


def test_nginx_answers_its_own_errors_in_the_api_shape(tmp_path):
    """No worker listening: 503 + Retry-After in JSON (SDKs retry); body over the limit: 413."""
    port, base = free_port(), free_port_run(2)
    env = clean_env(INGEST_WORKERS=2, INGEST_PORT=port, INGEST_LISTEN="127.0.0.1",
                    INGEST_WORKER_BASE_PORT=base, INGEST_NGINX=NGINX, INGEST_NGINX_WAIT_S=0,
                    INGEST_STATUS_PORT=free_port())
    nginx = Proc("nginx", [sys.executable, LAUNCH, "nginx"], str(tmp_path / "logs"), env=env,
                 cwd=str(tmp_path))
    nginx.start().wait_port("127.0.0.1", port)
    # The master listens before it forks its workers: poll for them (worker_processes
    # auto: one per core, at least one per core this test may run on), or the check at
    # the end could pass on a partial list.
    cores = len(os.sched_getaffinity(0))

    def all_workers():
        pids = child_pids(nginx.pid)
        return pids if len(pids) >= cores else None
    workers = wait_until(all_workers, timeout=5, message="nginx's %d workers" % cores)
    try:
        resp = roundtrip(port, b"POST /track HTTP/1.1\r\nHost: x\r\n"
                               b"Content-Type: application/x-www-form-urlencoded\r\n"
                               b"Content-Length: 6\r\n\r\ndata=x")
        head, body = resp.head, resp.body
        assert head.startswith(b"HTTP/1.1 503 "), head
        assert b"\r\nRetry-After: 1\r\n" in head + b"\r\n"
        assert json.loads(body) == {"status": 0, "error": "no worker available"}

        resp = roundtrip(port, b"POST /track HTTP/1.1\r\nHost: x\r\n"
                               b"Content-Length: %d\r\n\r\n" % (10 * 1024 * 1024 + 1))
        head, body = resp.head, resp.body
        assert head.startswith(b"HTTP/1.1 413 "), head
        assert json.loads(body) == {"status": 0, "error": "request body too large"}
    finally:
        assert nginx.stop() == 0, nginx.output()
    wait_until(lambda: not any(pid_alive(p) for p in workers), timeout=5,
               message="nginx worker processes gone")
