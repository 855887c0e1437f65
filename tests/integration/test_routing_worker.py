"""Issue 4 end to end: a worker with a routes file, records read back from the real queue."""
import json
import signal
import urllib.parse
import urllib.request

from testkit.payloads import write_routes
from testkit.procs import wait_until
from testkit.queues import assert_empty, read_all


def routes(path, acme_queue):
    write_routes(path, {
        "tokens": {"acme": {"track": acme_queue, "engage": "people_acme"}},
        "blocked_tokens": ["spam"],
        "overflow": {"events_per_second": 5, "burst": 5, "suffix": "_overflow"},
    })


def post(worker, endpoint, records):
    body = urllib.parse.urlencode({"data": json.dumps(records), "verbose": "1"}).encode()
    with urllib.request.urlopen(worker.url + endpoint, body, timeout=10) as resp:
        return json.loads(resp.read())


def events(token, n, prefix):
    return [{"event": "e", "properties": {"token": token, "$insert_id": "%s-%d" % (prefix, i)}}
            for i in range(n)]


def metric(worker, name):
    return worker.metric(name)


def ids(records):
    return [r["properties"]["$insert_id"] for r in records]


def test_routes_blocklist_overflow_and_reload(tmp_path, queue_server, make_worker):
    path = tmp_path / "routes.json"
    routes(path, "events_acme")
    worker = make_worker(queue_server.address, extra=["--routes", path])
    q = queue_server.address

    # A routed token lands in its own queue; an unknown one in the default queue.
    assert post(worker, "/track", events("acme", 3, "a")) == {"status": 1, "error": None}
    assert post(worker, "/track", events("other", 2, "o")) == {"status": 1, "error": None}
    assert post(worker, "/engage", [{"$token": "acme", "$distinct_id": "u", "$set": {"x": 1}}])["status"] == 1
    assert ids(read_all(q, "events_acme", 3)) == ["a-0", "a-1", "a-2"]
    assert ids(read_all(q, "events", 2)) == ["o-0", "o-1"]
    assert read_all(q, "people_acme", 1)[0]["$set"] == {"x": 1}

    # Blocked: answered as accepted, queued nowhere, counted.
    assert post(worker, "/track", events("spam", 4, "s")) == {"status": 1, "error": None}
    assert_empty(q, "events")
    assert metric(worker, "ingest_records_blocked_total") == 4.0

    # A burst above the rate splits between the queue and its overflow; nothing lost.
    assert post(worker, "/track", events("hot", 30, "h"))["status"] == 1
    main = read_all(q, "events", 5, settle_ms=0)
    spill = read_all(q, "events_overflow", 25)
    assert sorted(ids(main) + ids(spill), key=lambda s: int(s[2:])) == ["h-%d" % i for i in range(30)]
    assert ids(main) == ["h-%d" % i for i in range(5)]       # the first `burst` go through
    assert metric(worker, 'ingest_records_overflow_total{queue="events"}') == 25.0

    # SIGHUP with a new file reroutes without a restart.
    routes(path, "events_acme2")
    pid = worker.proc.pid
    worker.proc.signal(signal.SIGHUP)
    wait_until(lambda: metric(worker, "ingest_routes_reloads_total") == 1.0, timeout=10,
               message="the routes reload")
    assert post(worker, "/track", events("acme", 1, "b")) == {"status": 1, "error": None}
    assert ids(read_all(q, "events_acme2", 1)) == ["b-0"]
    assert_empty(q, "events_acme")
    assert worker.proc.pid == pid and worker.proc.alive()


def test_broken_routes_file_keeps_the_last_good_table(tmp_path, queue_server, make_worker):
    path = tmp_path / "routes.json"
    routes(path, "events_acme")
    worker = make_worker(queue_server.address, extra=["--routes", path])
    path.write_text('{"tokens": {"acme": {"track": "bad.name"}}}')
    worker.proc.signal(signal.SIGHUP)
    wait_until(lambda: metric(worker, "ingest_routes_reload_failures_total") == 1.0, timeout=10,
               message="the failed reload to be counted")
    assert post(worker, "/track", events("acme", 1, "k")) == {"status": 1, "error": None}
    assert ids(read_all(queue_server.address, "events_acme", 1)) == ["k-0"]
    assert "tokens.acme.track" in worker.proc.output()


def test_bad_routes_file_at_start_is_a_clear_error(tmp_path, queue_server):
    from testkit.procs import Worker
    path = tmp_path / "routes.json"
    path.write_text('{"queues": {"track": 5}}')
    w = Worker(tmp_path, queue_server.address, extra=["--routes", path], name="bad")
    w.proc.start()
    try:
        code = w.proc.popen.wait(timeout=20)
    finally:
        w.proc.stop()
    assert code != 0
    out = w.proc.output()
    assert "bad routes file" in out and "queues.track" in out and "Traceback" not in out
