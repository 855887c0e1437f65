"""The official mixpanel-browser SDK (2.83.0, unmodified) in headless Chromium.

tests/js/page.html is served by a second server on its own loopback port, so every SDK
request to the worker is cross-origin and only succeeds if the worker's CORS answers are
right.  tests/js/browser_sdk.js drives Debian's /usr/bin/chromium through playwright-core,
one fresh browser context per mode (no cookies, no localStorage), and reports the
requests it saw with the payloads it decoded itself.  For each mode the test reads the
records off the queues (blocking gets with a deadline, never sleeps) and checks them
against both our expectations and what the browser actually sent.  Needs `make js` and
`make chromium`.  It must not reach anything but 127.0.0.1.
"""
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest

from testkit.procs import ROOT, Proc, free_port, no_proxy_env
from testkit.queues import assert_empty, pop_processing_time, read_all

JS_DIR = os.path.join(ROOT, "tests", "js")
SCRIPT = os.path.join(JS_DIR, "browser_sdk.js")
CHROMIUM = "/usr/bin/chromium"
TOKEN = "browser-sdk-token"
CLIENT_IP = "127.0.0.1"
TEXT = "Zo\u00eb \u2713 \u6771\u4eac"

# name, SDK options, expected wire: (HTTP method, payload format, verbose=1 in the URL)
MODES = [
    ("batch", {}, ("POST", "base64", True)),
    ("batch-json", {"api_payload_format": "json"}, ("POST", "json", True)),
    ("legacy-get", {"batch_requests": False, "api_method": "GET"}, ("GET", "base64", False)),
    ("legacy-post", {"batch_requests": False}, ("POST", "base64", False)),
]
EVENT_NAMES = ["browser view", "browser click", "$identify", "browser done"]
QUEUE_OF = {"/track/": "events", "/engage/": "people", "/groups/": "groups"}
COUNTS = {"events": 4, "people": 2, "groups": 1}


class BrowserDriver:
    """browser_sdk.js as a child process we talk to line by line."""

    def __init__(self, node, config_path, logdir):
        self.err_path = os.path.join(str(logdir), "browser_sdk.err")
        with open(self.err_path, "wb") as err:
            self.popen = subprocess.Popen(
                [node, SCRIPT, str(config_path)], cwd=JS_DIR, env=no_proxy_env(),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                start_new_session=True)
        self.lines = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.popen.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def stderr(self):
        with open(self.err_path, "rb") as fh:
            return fh.read()[-3000:].decode("utf-8", "replace")

    def expect(self, event, timeout_s=20.0):
        """The next message from the script, which must be `event`."""
        try:
            line = self.lines.get(timeout=timeout_s)
        except queue.Empty:
            line = None
        if line is None:
            raise AssertionError("browser_sdk.js: no %r message; stderr:\n%s"
                                 % (event, self.stderr()))
        message = json.loads(line)
        assert message["event"] == event, "wanted %r, got %r\n%s" % (event, message,
                                                                    self.stderr())
        return message

    def proceed(self):
        self.popen.stdin.write("next\n")
        self.popen.stdin.flush()

    def stop(self):
        # EOF on stdin makes the script close Chromium and exit; escalate if it does not.
        try:
            self.popen.stdin.close()
        except OSError:
            pass
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.popen.terminate()  # playwright-core closes the browser on SIGTERM
            try:
                self.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                # Our own session: the script and the Chromium it started.
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=5)


@pytest.fixture
def page_server(tmp_path):
    """tests/js over plain HTTP on a second port: a different origin from the worker."""
    port = free_port()
    proc = Proc("pages", [sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                          str(port), "--directory", JS_DIR], os.path.join(str(tmp_path), "logs"))
    proc.start().wait_port("127.0.0.1", port)
    yield "http://127.0.0.1:%d" % port
    proc.stop()


@pytest.fixture
def browser_ready():
    node = shutil.which("node")
    assert node, "node is not installed"
    assert os.access(CHROMIUM, os.X_OK), "%s missing: run `make chromium`" % CHROMIUM
    for package in ("mixpanel-browser", "playwright-core"):
        assert os.path.isdir(os.path.join(JS_DIR, "node_modules", package)), \
            "tests/js/node_modules/%s missing: run `make js`" % package
    return node


def sent_records(requests):
    """{queue: [record, ...]} in the order the browser sent them, retries counted once."""
    out = {name: [] for name in COUNTS}
    seen = set()
    for req in requests:
        path = urllib.parse.urlsplit(req["url"]).path
        for record in req["records"] or []:
            key = json.dumps([path, record], sort_keys=True)
            if key not in seen:
                seen.add(key)
                out[QUEUE_OF[path]].append(record)
    return out


def check_wire(requests, page_origin, wire):
    method, payload_format, verbose = wire
    assert requests, "the browser sent nothing to the worker"
    for req in requests:
        where = "%s %s" % (req["method"], req["url"][:120])
        assert req["failure"] is None and req["status"] == 200, (where, req)
        assert urllib.parse.urlsplit(req["url"]).path in QUEUE_OF, where
        assert req["method"] == method and req["format"] == payload_format, (where, req)
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(req["url"]).query)
        assert query["ip"] == ["1"], where
        assert (query.get("verbose") == ["1"]) is verbose, where
        # CORS: the page's origin is echoed and credentials allowed, or XHR would fail.
        assert req["request_headers"].get("origin") == page_origin, where
        assert req["headers"].get("access-control-allow-origin") == page_origin, (where, req)
        assert req["headers"].get("access-control-allow-credentials") == "true", (where, req)


def check_records(mode, landed, sent, start, end):
    """Landed = sent + the worker's documented additions; sent = what page.html did."""
    distinct_id = "user-" + mode
    assert [e["event"] for e in sent["events"]] == EVENT_NAMES
    custom = [{"mode": mode, "step": 1, "text": TEXT},
              {"mode": mode, "step": 2, "list": [1, "two", True]}, {}, {"mode": mode, "step": 3}]
    for event, extra in zip(sent["events"], custom):
        props = event["properties"]
        assert props["token"] == TOKEN and props["mp_lib"] == "web"
        assert {k: props[k] for k in extra} == extra
        assert "ip" not in props
    assert sent["events"][3]["properties"]["distinct_id"] == distinct_id
    assert sent["people"][1]["$set"]["plan"] == "pro"
    assert all(p["$distinct_id"] == distinct_id and p["$token"] == TOKEN for p in sent["people"])
    assert sent["groups"] == [{"$set": {"name": "Acme", "mode": mode}, "$group_key": "company",
                               "$group_id": "acme-" + mode, "$token": TOKEN}]

    for got, want in zip(landed["events"], sent["events"]):
        pop_processing_time(got["properties"], start, end)
        assert got == {"event": want["event"],
                       "properties": dict(want["properties"], ip=CLIENT_IP)}
    for name in ("people", "groups"):
        assert landed[name] == [dict(r, **{"$ip": CLIENT_IP}) for r in sent[name]]


def summary(requests):
    return "\n".join("  %s %s -> %s %s %s" % (r["method"], r["url"][:100], r["status"],
                                               r["failure"] or "", (r.get("body") or "")[:200])
                     for r in requests)


def run_mode(driver, address, mode, wire):
    start = time.time()
    called = driver.expect("called")
    assert called["mode"] == mode
    # batch: 1 when queued; legacy: Number("1") from the worker's plain answer.
    assert called["results"] == [1] * 5, called
    assert called["distinct_id"] == "user-" + mode
    try:
        landed = {name: read_all(address, name, count, timeout_s=15)
                  for name, count in COUNTS.items()}
        failure = None
    except AssertionError as e:
        failure = e
    end = time.time()
    driver.proceed()  # the script now waits for its requests and reports them
    requests = driver.expect("requests")["requests"]
    if failure is not None:
        raise AssertionError("%s\nrequests the browser sent:\n%s" % (failure, summary(requests)))
    check_wire(requests, called["page_origin"], wire)
    check_records(mode, landed, sent_records(requests), start, end)


def test_browser_sdk_modes(browser_ready, tmp_path, queue_server, worker, page_server):
    config = tmp_path / "browser.json"
    config.write_text(json.dumps({
        "token": TOKEN, "apiHost": worker.url, "pageUrl": page_server + "/page.html",
        "modes": [{"name": name, "options": options} for name, options, _ in MODES]}))
    driver = BrowserDriver(browser_ready, config, tmp_path)
    try:
        driver.expect("started", timeout_s=30)
        for name, _, wire in MODES:
            try:
                run_mode(driver, queue_server.address, name, wire)
            except AssertionError as e:
                raise AssertionError("mode %s: %s" % (name, e)) from e
        driver.expect("done")
    finally:
        driver.stop()
    for name in COUNTS:  # nothing resent late (e.g. by a sendBeacon on page close)
        assert_empty(queue_server.address, name, wait_ms=100)
