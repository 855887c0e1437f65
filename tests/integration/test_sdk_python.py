"""The official `mixpanel` SDK from PyPI (5.4.1, unmodified) against a real worker.

Each test starts its own queue server and worker (fixtures in conftest.py), points the
SDK's `Consumer`/`BufferedConsumer` URLs at the worker, and asserts the exact records that
land on the queues.  A thin consumer wrapper records the JSON the SDK hands to its real
consumer (the SDK's documented `consumer=` hook), so a landed record can be compared with
what was sent field by field.  These tests must not reach anything but 127.0.0.1.
"""
import datetime
import json
import re
import time

import mixpanel
import pytest

from testkit.payloads import write_routes
from testkit.queues import assert_empty, pop_processing_time, read_all

TOKEN = "py-sdk-token"
SECRET = "py-sdk-secret-2f7c"
ROUTES = {"secrets": {TOKEN: SECRET}}   # the /import secret for TOKEN
NAME = "Zo\u00eb \u2713 \u6771\u4eac \U0001F680"


class Recording:
    """Pass every message to the real consumer, keeping a decoded copy of each."""

    def __init__(self, inner):
        self.inner = inner
        self.sent = []

    def send(self, endpoint, json_message, api_key=None, api_secret=None):
        self.sent.append((endpoint, json.loads(json_message)))
        return self.inner.send(endpoint, json_message, api_key, api_secret)

    def flush(self):
        return self.inner.flush()

    def messages(self, endpoint):
        return [m for e, m in self.sent if e == endpoint]


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    # requests honours proxy variables; the worker is on loopback.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def urls(base):
    return dict(events_url=base + "/track", people_url=base + "/engage",
                groups_url=base + "/groups", import_url=base + "/import")


def client(worker, buffered=False, **kwargs):
    consumer_class = mixpanel.BufferedConsumer if buffered else mixpanel.Consumer
    recording = Recording(consumer_class(**urls(worker.url), **kwargs))
    return mixpanel.Mixpanel(TOKEN, consumer=recording), recording


def check_sdk_event(sent, name, distinct_id, custom, start, end):
    """`sent` is what the SDK built for track(): its own fields plus ours, nothing else."""
    props = sent["properties"]
    assert re.fullmatch(r"[0-9a-f]{32}", props["$insert_id"]), props
    assert isinstance(props["time"], float) and start - 1 <= props["time"] <= end + 1, props
    assert sent == {"event": name, "properties": dict(
        custom, token=TOKEN, distinct_id=distinct_id, mp_lib="python",
        **{"$lib_version": mixpanel.__version__, "time": props["time"],
           "$insert_id": props["$insert_id"]})}


def assert_events_landed(landed, sent, start, end):
    """Each landed event is the sent one plus mp_processing_time_ms; `time` (seconds) kept."""
    assert len(landed) == len(sent)
    for got, want in zip(landed, sent):
        pop_processing_time(got["properties"], start, end)
        assert got == want


def test_consumer_track_people_and_groups(queue_server, worker):
    mp, rec = client(worker)
    signed_up = datetime.datetime(2026, 1, 2, 3, 4, 5)
    custom = {"plan": "pro", "name": NAME, "signed_up": signed_up, "n": 3, "ratio": 0.5,
              "flag": True, "missing": None, "tags": ["a", "b"], "nested": {"k": [1, {"x": "y"}]}}
    start = time.time()
    mp.track("py-1", "py signup", custom)
    mp.track("py-2", "py second", {"step": 2})
    mp.people_set("py-1", {"$name": NAME, "plan": "pro"})
    mp.people_increment("py-1", {"logins": 2, "credits": -1.5})
    mp.people_union("py-1", {"colors": ["red", "blue"]})
    mp.people_unset("py-1", ["plan"])
    mp.people_delete("py-1")
    mp.group_set("company", "acme", {"name": "Acme", "seats": 10})
    mp.group_union("company", "acme", {"regions": ["eu", "us"]})
    mp.group_remove("company", "acme", {"regions": "us"})
    mp.group_unset("company", "acme", ["seats"])
    mp.group_delete("company", "acme")
    end = time.time()

    events = rec.messages("events")
    expected_custom = dict(custom, signed_up="2026-01-02T03:04:05")
    check_sdk_event(events[0], "py signup", "py-1", expected_custom, start, end)
    check_sdk_event(events[1], "py second", "py-2", {"step": 2}, start, end)
    assert_events_landed(read_all(queue_server.address, "events", 2), events, start, end)

    # Profile and group updates land exactly as sent (ip=0, so no $ip is added).
    people = rec.messages("people")
    assert [sorted(set(p) - {"$token", "$time", "$distinct_id"}) for p in people] == [
        ["$set"], ["$add"], ["$union"], ["$unset"], ["$delete"]]
    assert people[1]["$add"] == {"logins": 2, "credits": -1.5}
    assert people[0]["$set"] == {"$name": NAME, "plan": "pro"}
    assert all(p["$token"] == TOKEN and p["$distinct_id"] == "py-1" for p in people)
    assert read_all(queue_server.address, "people", 5) == people

    groups = rec.messages("groups")
    assert [g["$group_id"] for g in groups] == ["acme"] * 5
    assert [sorted(set(g) - {"$token", "$time", "$group_key", "$group_id"}) for g in groups] == [
        ["$set"], ["$union"], ["$remove"], ["$unset"], ["$delete"]]
    assert read_all(queue_server.address, "groups", 5) == groups
    assert_empty(queue_server.address, "imports", wait_ms=100)


def test_import_data_with_api_secret(queue_server, make_worker, tmp_path):
    routes = write_routes(tmp_path / "routes.json", ROUTES)
    worker = make_worker(queue_server.address, extra=("--routes", routes))
    mp, rec = client(worker)
    old = int(time.time()) - 90 * 86400  # far beyond /track's 5-day window
    start = time.time()
    mp.import_data(None, "py-old", "py imported", old, {"source": "backfill", "name": NAME},
                   api_secret=SECRET)
    end = time.time()
    sent = rec.messages("imports")
    assert sent[0]["properties"]["time"] == old
    assert sent[0]["properties"]["source"] == "backfill"
    landed = read_all(queue_server.address, "imports", 1)
    assert_events_landed(landed, sent, start, end)
    assert_empty(queue_server.address, "events", wait_ms=100)


def test_import_with_service_account(queue_server, make_worker, tmp_path):
    # Basic `username:secret` plus `?project_id=`; the secret is what the worker checks.
    routes = write_routes(tmp_path / "routes.json", ROUTES)
    worker = make_worker(queue_server.address, extra=("--routes", routes))
    credentials = mixpanel.ServiceAccountCredentials("svc-user", SECRET, "12345")
    mp, rec = client(worker, credentials=credentials)
    old = int(time.time()) - 30 * 86400
    start = time.time()
    mp.import_data(None, "py-svc", "py service import", old, {"via": "service account"})
    end = time.time()
    assert_events_landed(read_all(queue_server.address, "imports", 1),
                         rec.messages("imports"), start, end)


def test_import_with_wrong_secret_raises_and_stores_nothing(queue_server, make_worker,
                                                            tmp_path):
    routes = write_routes(tmp_path / "routes.json", ROUTES)
    worker = make_worker(queue_server.address, extra=("--routes", routes))
    mp, _ = client(worker)
    old = int(time.time()) - 90 * 86400
    with pytest.raises(mixpanel.MixpanelException):
        mp.import_data(None, "py-old", "py imported", old, api_secret="not-the-secret")
    assert_empty(queue_server.address, "imports")


def test_buffered_consumer_120_events_in_order(queue_server, worker):
    mp, rec = client(worker, buffered=True, max_size=50)
    start = time.time()
    for i in range(120):
        mp.track("py-buf-%d" % (i % 7), "py buffered", {"seq": i, "name": NAME})
    # BufferedConsumer has already sent two batches of 50; 20 wait in its buffer.
    first = read_all(queue_server.address, "events", 100)
    mp.people_set("py-buf-0", {"batch": True})
    mp.people_increment("py-buf-0", {"batches": 3})
    rec.flush()
    end = time.time()
    rest = read_all(queue_server.address, "events", 20)
    sent = rec.messages("events")
    assert [e["properties"]["seq"] for e in sent] == list(range(120))
    assert_events_landed(first + rest, sent, start, end)
    assert read_all(queue_server.address, "people", 2) == rec.messages("people")


def test_rejected_record_raises_mixpanel_exception(queue_server, worker):
    consumer = mixpanel.Consumer(**urls(worker.url))
    mp = mixpanel.Mixpanel("", consumer=consumer)  # an empty token is never valid
    with pytest.raises(mixpanel.MixpanelException) as caught:
        mp.track("py-x", "py no token")
    assert str(caught.value).startswith("Mixpanel error: record 0: ")
    assert "token" in str(caught.value)
    assert_empty(queue_server.address, "events")
