"""The official `mixpanel` SDK from npm (0.24.0, unmodified) against a real worker.

tests/js/node_sdk.js runs a plan of SDK calls (one Node process per test, bounded by a
timeout) and reports each callback's error plus the raw requests it put on the wire; the
records that land on the queues are then compared with what the Node SDK is documented to
build: our properties plus `token`, `mp_lib`, `$lib_version` for events, and exactly our
fields for profile/group updates.  Needs `make js` (npm ci in tests/js).
These tests must not reach anything but 127.0.0.1.
"""
import base64
import json
import os
import shutil
import subprocess
import time
import urllib.parse

import pytest

from testkit.payloads import write_routes
from testkit.procs import ROOT, no_proxy_env
from testkit.queues import (assert_empty, pop_filled_time, pop_processing_time,
                                  read_all)

JS_DIR = os.path.join(ROOT, "tests", "js")
SCRIPT = os.path.join(JS_DIR, "node_sdk.js")
TOKEN = "node-sdk-token"
SECRET = "node-sdk-secret-81d0"
ROUTES = {"secrets": {TOKEN: SECRET}}   # the /import secret for TOKEN
NODE_LIB = {"mp_lib": "node", "$lib_version": "0.24.0"}
NAME = "Zo\u00eb \u2713 \u6771\u4eac \U0001F680"
# base64 of this text is full of '+' and '/' ("fn5+Pj4+Pz8/" ...).
AWKWARD = "~~~>>>???"


@pytest.fixture(scope="module")
def node():
    path = shutil.which("node")
    assert path, "node is not installed"
    assert os.path.isdir(os.path.join(JS_DIR, "node_modules", "mixpanel")), \
        "tests/js/node_modules missing: run `make js`"
    return path


def run_plan(node, tmp_path, clients, steps, timeout_s=30):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"clients": clients, "steps": steps}))
    done = subprocess.run([node, SCRIPT, str(plan)], cwd=JS_DIR, env=no_proxy_env(),
                          capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, "node_sdk.js failed (%s):\n%s\n%s" % (
        done.returncode, done.stdout[-2000:], done.stderr[-2000:])
    return json.loads(done.stdout)


def client_spec(worker, **options):
    return {"token": TOKEN, "options": dict(host="127.0.0.1:%d" % worker.port,
                                            protocol="http", **options)}


def step(client, method, *args):
    return {"client": client, "method": method, "args": list(args)}


def errors(report):
    return [(r["method"], r["error"]) for r in report["results"] if r["error"]]


def node_event(name, props):
    return {"event": name, "properties": dict(props, token=TOKEN, **NODE_LIB)}


def check_event(got, want, start, end, time_filled):
    pop_processing_time(got["properties"], start, end)
    if time_filled:
        pop_filled_time(got["properties"], start, end)
    assert got == want


def test_track_people_groups_import_and_prefix(node, tmp_path, queue_server, make_worker):
    routes = write_routes(tmp_path / "routes.json", ROUTES)
    worker = make_worker(queue_server.address, extra=("--routes", routes))
    now_ms = int(time.time() * 1000)
    timed_ms = now_ms - 60000                  # a Date: the SDK sends milliseconds
    old_ms = now_ms - 90 * 86400 * 1000        # /import has no 5-day window
    clients = {"plain": client_spec(worker), "verbose": client_spec(worker, verbose=True),
               "geo": client_spec(worker, geolocate=True), "key": client_spec(worker, key=SECRET),
               "prefix": client_spec(worker, path="/prefix")}
    signup = {"distinct_id": "n-1", "plan": "pro", "name": NAME, "n": 3, "ratio": 0.25,
              "flag": False, "tags": ["a", "b"], "nested": {"k": [1, {"x": None}]}}
    steps = [
        step("plain", "track", "node signup", signup),
        step("plain", "track", "node timed", {"distinct_id": "n-1", "time": {"$date": timed_ms}}),
        step("verbose", "track", "node verbose", {"distinct_id": "n-1"}),
        step("geo", "track", "node geo", {"distinct_id": "n-1"}),
        step("prefix", "track", "node prefixed", {"distinct_id": "n-1"}),
        step("plain", "people.set", "n-1", {"$name": NAME, "plan": "pro"}),
        step("plain", "people.increment", "n-1", {"logins": 2}),
        step("plain", "people.append", "n-1", {"pages": "home"}),
        step("plain", "people.union", "n-1", {"colors": ["red", "blue"]}),
        step("plain", "people.remove", "n-1", {"pages": "home"}),
        step("plain", "people.unset", "n-1", ["plan"]),
        step("geo", "people.set", "n-2", {"plan": "free"}),
        step("plain", "people.delete_user", "n-1"),
        step("verbose", "groups.set", "company", "acme", {"name": "Acme", "seats": 10}),
        step("plain", "groups.delete_group", "company", "acme"),
        step("key", "import", "node imported", {"$date": old_ms},
             {"distinct_id": "n-old", "$insert_id": "node-import-0001", "source": "backfill"}),
    ]
    start = time.time()
    report = run_plan(node, tmp_path, clients, steps)
    end = time.time()
    assert errors(report) == []
    paths = [urllib.parse.urlsplit(r["path"]).path for r in report["requests"]]
    assert paths[4] == "/prefix/track" and paths[-1] == "/import"

    events = read_all(queue_server.address, "events", 5)
    check_event(events[0], node_event("node signup", signup), start, end, time_filled=True)
    check_event(events[1], node_event("node timed", {"distinct_id": "n-1",
                                                     "time": timed_ms / 1000.0}),
                start, end, time_filled=False)
    check_event(events[2], node_event("node verbose", {"distinct_id": "n-1"}), start, end, True)
    check_event(events[3], node_event("node geo", {"distinct_id": "n-1", "ip": "127.0.0.1"}),
                start, end, True)
    check_event(events[4], node_event("node prefixed", {"distinct_id": "n-1"}), start, end, True)

    person = {"$token": TOKEN, "$distinct_id": "n-1"}
    assert read_all(queue_server.address, "people", 8) == [
        dict(person, **{"$set": {"$name": NAME, "plan": "pro"}}),
        dict(person, **{"$add": {"logins": 2}}),
        dict(person, **{"$append": {"pages": "home"}}),
        dict(person, **{"$union": {"colors": ["red", "blue"]}}),
        dict(person, **{"$remove": {"pages": "home"}}),
        dict(person, **{"$unset": ["plan"]}),
        {"$token": TOKEN, "$distinct_id": "n-2", "$set": {"plan": "free"}, "$ip": "127.0.0.1"},
        dict(person, **{"$delete": ""}),
    ]
    group = {"$token": TOKEN, "$group_key": "company", "$group_id": "acme"}
    assert read_all(queue_server.address, "groups", 2) == [
        dict(group, **{"$set": {"name": "Acme", "seats": 10}}), dict(group, **{"$delete": ""})]

    imported = read_all(queue_server.address, "imports", 1)
    check_event(imported[0], node_event("node imported", {
        "distinct_id": "n-old", "$insert_id": "node-import-0001", "source": "backfill",
        "time": old_ms / 1000.0}), start, end, time_filled=False)


def awkward_events(count, prefix):
    return [{"event": "node batch", "properties": {
        "distinct_id": "%s-%d" % (prefix, i % 5), "seq": i,
        "text": AWKWARD * (1 + i % 4) + NAME, "blob": "?" * (i % 3) + ">" * (i % 5)}}
        for i in range(count)]


def assert_raw_plus(report, path):
    """The SDK wrote `data=<base64>` unescaped: some body carries a literal '+'."""
    bodies = [r["body"] for r in report["requests"]
              if r["method"] == "POST" and r["path"].startswith(path + "?")]
    assert bodies and all(b.startswith("data=") and "%" not in b for b in bodies)
    assert any("+" in b for b in bodies) and any("/" in b for b in bodies)
    for body in bodies:  # and each one is valid base64 of JSON as written
        json.loads(base64.b64decode(body[len("data="):], validate=True))


def test_track_batch_and_import_batch_with_unescaped_plus(node, tmp_path, queue_server,
                                                          make_worker):
    routes = write_routes(tmp_path / "routes.json", ROUTES)
    worker = make_worker(queue_server.address, extra=("--routes", routes))
    tracked = awkward_events(120, "t")
    old_ms = int(time.time() * 1000) - 30 * 86400 * 1000
    imported = [dict(e, properties=dict(e["properties"], time=old_ms + i,
                                        **{"$insert_id": "imp-%04d" % i}))
                for i, e in enumerate(awkward_events(60, "i"))]
    clients = {"plain": client_spec(worker), "key": client_spec(worker, key=SECRET)}
    steps = [step("plain", "track_batch", tracked), step("key", "import_batch", imported)]
    start = time.time()
    report = run_plan(node, tmp_path, clients, steps)
    end = time.time()
    assert errors(report) == []
    assert_raw_plus(report, "/track")
    assert_raw_plus(report, "/import")

    # Batches of 50 are sent concurrently, so order holds only within a batch.
    landed = sorted(read_all(queue_server.address, "events", 120),
                    key=lambda e: e["properties"]["seq"])
    for got, sent in zip(landed, tracked):
        # Batch items get only `token` from the SDK, no mp_lib.
        want = {"event": sent["event"], "properties": dict(sent["properties"], token=TOKEN)}
        check_event(got, want, start, end, time_filled=True)
    landed = sorted(read_all(queue_server.address, "imports", 60),
                    key=lambda e: e["properties"]["seq"])
    for got, sent in zip(landed, imported):
        props = dict(sent["properties"], token=TOKEN, time=sent["properties"]["time"] / 1000.0)
        check_event(got, {"event": sent["event"], "properties": props}, start, end, False)


def test_rejections_reach_the_callbacks(node, tmp_path, queue_server, make_worker):
    routes = write_routes(tmp_path / "routes.json", ROUTES)
    worker = make_worker(queue_server.address, extra=("--routes", routes))
    stale = {"$date": int(time.time() * 1000) - 10 * 86400 * 1000}  # /track: last 5 days only
    clients = {"plain": client_spec(worker), "verbose": client_spec(worker, verbose=True),
               "badkey": client_spec(worker, key="not-the-secret")}
    steps = [
        step("plain", "track", "node stale", {"distinct_id": "n-1", "time": stale}),
        step("verbose", "track", "node stale", {"distinct_id": "n-1", "time": stale}),
        step("badkey", "import", "node imported", {"$date": int(time.time() * 1000)},
             {"distinct_id": "n-1", "$insert_id": "node-import-0002"}),
    ]
    report = run_plan(node, tmp_path, clients, steps)
    plain, verbose, badkey = [r["error"] for r in report["results"]]
    assert plain == "Mixpanel Server Error: 0"
    assert verbose.startswith("Mixpanel Server Error: record 0: ") and "time" in verbose
    assert badkey is not None and badkey.startswith("Mixpanel Server Error: ")
    assert_empty(queue_server.address, "events", wait_ms=200)
    assert_empty(queue_server.address, "imports", wait_ms=100)
