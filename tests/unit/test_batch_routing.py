"""A batch cleaned record by record, then routed and encoded as a whole (App.route_batch,
with RoutingTable.route_many and App.encode_run) ends exactly as route_all's per-record
loop (route_all with batch=False) leaves it: the same queued pairs in order, rejections
by index, reason and field, accepted count, rejection counts, routing counters and
cleaned records.
"""
import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest import clean
from ingest.errors import RecordRejected
from ingest.http import app as app_module
from ingest.routing import RoutingTable

from .golden.harness import NOW, call, make

NOW_MS_TIME = int(NOW * 1000)
TIMES = st.one_of(
    st.just("absent"), st.none(), st.booleans(), st.just("1"),
    st.integers(NOW_MS_TIME - 10 ** 9, NOW_MS_TIME + 10 ** 7),        # ms, some too old/new
    st.integers(int(NOW) - 10 ** 6, int(NOW) + 10 ** 4),               # seconds
    st.floats(NOW - 10 ** 6, NOW + 10 ** 4),
    st.sampled_from([10 ** 400, float("inf"), -1, int(clean.MS_THRESHOLD)]))
VALUES = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=4),
                   st.just("\ud800"), st.just("x" * 300), st.just("y" * 60),
                   st.floats(allow_nan=False, allow_infinity=False),
                   st.lists(st.integers(), max_size=2),
                   st.dictionaries(st.text(max_size=2), st.integers(), max_size=2))
TOKENS = ["tok", "tok", "tok", "other", "bad", "stranger", "", 7]


@st.composite
def track_records(draw):
    props = draw(st.dictionaries(st.sampled_from(["a", "ip", "mp_processing_time_ms"]),
                                 VALUES, max_size=3))
    props["token"] = draw(st.sampled_from(TOKENS))
    time = draw(TIMES)
    if time != "absent":
        props["time"] = time
    record = {"event": draw(st.sampled_from(["Signed Up"] * 8 + ["", 3])),
              "properties": props}
    return draw(st.sampled_from([record] * 12 + [[record], "x", {"event": "e"}]))


@st.composite
def engage_records(draw):
    record = {"$token": draw(st.sampled_from(TOKENS)), "$distinct_id": "u1",
              "$set": draw(st.dictionaries(st.sampled_from(["a", "b"]), VALUES, max_size=2))}
    return draw(st.sampled_from([record] * 6 + [{"$token": "tok"}, None]))


def tables():
    data = {"tokens": {"other": {"track": "events_other", "engage": "people_other"},
                       "bad": {}},
            "blocked_tokens": ["bad"]}
    return {"defaults": {}, "tokens": data,
            "overflow": dict(data, overflow={"events_per_second": 2, "burst": 3})}


def ordered(value):
    """`value` with every dict's key order visible (dict == ignores it)."""
    if isinstance(value, dict):
        return [(k, ordered(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [ordered(v) for v in value]
    if isinstance(value, float):
        return ("float", repr(value))
    return (type(value).__name__, value)


def outcome(as_batch, endpoint, batch, table_name, plain, ip, max_record_bytes):
    """What route_all makes of a copy of `batch`, as a batch or record by record."""
    app, _sink = make(max_record_bytes=max_record_bytes)
    counted = []
    app.count = lambda *args: counted.append(args)
    table = RoutingTable.from_dict(tables()[table_name])
    records = copy.deepcopy(batch)
    ctx = clean.Context(NOW + 0.000456, ip, max_properties=5, max_depth=20,
                        max_string=100, data_chars=None, nesting=None)
    pairs, rejected, accepted = app.route_all(endpoint, records, ctx, table, None, NOW, plain,
                                              batch=as_batch)
    return {"pairs": pairs, "rejected": [(i, e.reason, e.field) for i, e in rejected],
            "accepted": accepted, "counted": sorted(counted), "records": ordered(records),
            "table": (table.unknown, table.blocked, table.overflowed)}


@settings(max_examples=700, deadline=None)
@given(st.sampled_from(["track", "engage"]).flatmap(lambda endpoint: st.tuples(
           st.just(endpoint),
           st.lists(track_records() if endpoint == "track" else engage_records(),
                    min_size=2, max_size=7))),
       st.sampled_from(sorted(tables())), st.booleans(), st.sampled_from([None, "10.0.0.1"]),
       st.sampled_from([1_000_000, 150]))
def test_a_batch_routed_as_a_whole_ends_as_record_by_record(endpoint_batch, table_name, plain,
                                                            ip, max_record_bytes):
    endpoint, batch = endpoint_batch
    args = (endpoint, batch, table_name, plain, ip, max_record_bytes)
    assert outcome(True, *args) == outcome(False, *args)


@pytest.mark.parametrize("tokens", [["tok"] * 5, ["bad"] * 4, ["other"] * 6,
                                    ["tok", "other", "bad", "tok", "stranger"]])
@pytest.mark.parametrize("table_name", sorted(tables()))
def test_route_many_routes_and_counts_as_route(table_name, tokens):
    many = RoutingTable.from_dict(tables()[table_name])
    each = RoutingTable.from_dict(tables()[table_name])
    assert many.route_many("track", tokens, NOW) == [each.route("track", t, NOW) for t in tokens]
    assert (many.unknown, many.blocked, many.overflowed) == (
        each.unknown, each.blocked, each.overflowed)


def test_the_batch_benchmark_request_is_routed_as_a_whole(monkeypatch):
    """The whole-batch path is the one the benchmark's batches take (else the tests
    above would pass with a route_all that never handed a batch to route_batch)."""
    from bench.wrk_bench import event, shape
    _path, form, events = shape("batch50")
    wholes = []
    real = app_module.App.encode_run
    monkeypatch.setattr(app_module.App, "encode_run",
                        lambda self, *args: wholes.append(args[1]) or real(self, *args))
    app, sink = make(now=event(events - 1)["properties"]["time"] / 1000.0 + 1)
    response = call(app, "POST", "/track", "ip=1", form.encode(),
                    "application/x-www-form-urlencoded")
    assert (response.status, response.body) == (200, b"1")
    assert len(sink.items) == events and len(wholes) == 1 and len(wholes[0]) == events


def test_route_many_on_a_strict_table_refuses_as_route_does():
    data = {"strict_tokens": True, "tokens": {"tok": {}, "other": {"track": "events_other"}}}
    many, each = RoutingTable.from_dict(data), RoutingTable.from_dict(data)
    assert many.route_many("track", ["tok", "other", "tok"], NOW) == [
        each.route("track", t, NOW) for t in ["tok", "other", "tok"]]
    with pytest.raises(RecordRejected) as info:
        many.route_many("track", ["tok", "stranger", "tok"], NOW)
    assert (info.value.reason, info.value.field) == ("unknown_token", "properties.token")
