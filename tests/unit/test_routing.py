"""Unit tests for ingest.routing: build, lookup, blocked, strict, overflow (fake clock),
idle-token forgetting, secrets, validation errors, files, and Router reload."""
import json
import logging
import tracemalloc
from fractions import Fraction

import pytest
from hypothesis import example, given, settings, strategies as st

from ingest import routing
from ingest.errors import RecordRejected
from ingest.routing import BLOCKED, RoutesError, RoutingTable, Router

T0 = 5000.0   # fake clock origin (seconds)
EPOCH = 1_800_000_000.123     # an epoch-sized clock, as time.time() gives


def table(**data):
    return RoutingTable.from_dict(data)


# ---- build and lookup -------------------------------------------------------------------

def test_default_table_routes_each_endpoint_to_its_default_queue():
    t = routing.default_table()
    got = {ep: t.route(ep, "anytoken", T0) for ep in routing.ENDPOINTS}
    assert got == {"track": "events", "engage": "people", "groups": "groups",
                   "import": "imports"}
    assert t.unknown == 4
    assert t.blocked == 0 and t.overflowed == {}
    assert t.strict_tokens is False
    assert t.secret("anytoken") is None


def test_empty_dict_equals_defaults():
    t = table()
    assert t.route("track", "x", T0) == "events"
    assert len(t) == 0


def test_queues_override_defaults_per_endpoint():
    t = table(queues={"track": "ev", "import": "imp"})
    assert [t.route(ep, "x", T0) for ep in routing.ENDPOINTS] == ["ev", "people", "groups",
                                                                   "imp"]


def test_token_override_applies_to_its_endpoints_only():
    t = table(queues={"engage": "ppl"},
              tokens={"acme": {"track": "events_acme"}, "beta": {}})
    assert t.route("track", "acme", T0) == "events_acme"
    assert t.route("engage", "acme", T0) == "ppl"        # file default, not built-in
    assert t.route("groups", "acme", T0) == "groups"
    assert t.route("track", "beta", T0) == "events"
    assert t.route("track", "other", T0) == "events"
    assert t.unknown == 1                                 # only "other"
    assert len(t) == 2


def test_tokens_with_equal_overrides_share_one_row():
    t = table(tokens={"a": {"track": "q1"}, "b": {"track": "q1"}, "c": {"track": "q2"}})
    assert t._rows["a"] is t._rows["b"]
    assert t._rows["a"] is not t._rows["c"]
    assert t.route("track", "b", T0) == "q1" and t.route("track", "c", T0) == "q2"


def test_unknown_endpoint_is_a_key_error():
    with pytest.raises(KeyError):
        routing.default_table().route("decide", "x", T0)


# ---- blocked tokens ---------------------------------------------------------------------

def test_blocked_token_returns_sentinel_and_is_counted_on_every_endpoint():
    t = table(blocked_tokens=["bad"], tokens={"bad": {"track": "events_bad"}})
    assert [t.route(ep, "bad", T0) for ep in routing.ENDPOINTS] == [BLOCKED] * 4
    assert t.blocked == 4
    assert t.route("track", "good", T0) == "events"
    assert t.blocked == 4
    assert repr(BLOCKED) == "BLOCKED"


def test_blocked_token_is_not_rejected_by_strict_and_does_not_use_the_bucket():
    t = table(blocked_tokens=["bad"], strict_tokens=True,
              overflow={"events_per_second": 1, "burst": 1})
    for _ in range(5):
        assert t.route("track", "bad", T0) is BLOCKED
    assert len(t._limiter) == 0
    assert t.overflowed == {}


# ---- strict and unknown tokens ----------------------------------------------------------

@pytest.mark.parametrize("endpoint, field", [("track", "properties.token"),
                                             ("import", "properties.token"),
                                             ("engage", "$token"), ("groups", "$token")])
def test_strict_rejects_unknown_token_naming_the_field(endpoint, field):
    t = table(strict_tokens=True, tokens={"acme": {}})
    with pytest.raises(RecordRejected) as info:
        t.route(endpoint, "stranger", T0)
    assert info.value.reason == "unknown_token"
    assert info.value.field == field
    assert t.unknown == 0


def test_strict_accepts_tokens_known_from_tokens_or_secrets():
    t = table(strict_tokens=True, tokens={"acme": {"track": "ev_acme"}},
              secrets={"imp": "s3cret"})
    assert t.route("track", "acme", T0) == "ev_acme"
    assert t.route("engage", "acme", T0) == "people"
    assert t.route("import", "imp", T0) == "imports"


# ---- secrets ----------------------------------------------------------------------------

def test_secret_lookup_and_matching():
    t = table(secrets={"acme": "s3cret", "beta": "other"})
    assert t.secret("acme") == "s3cret"
    assert t.secret("nope") is None
    assert t.secret_matches("s3cret") and t.secret_matches("other")
    assert not t.secret_matches("s3cre")
    assert not t.secret_matches("")
    assert not t.secret_matches(None)
    assert not t.secret_matches(b"s3cret")
    assert not routing.default_table().secret_matches("s3cret")


# ---- overflow with a fake clock ---------------------------------------------------------

def test_no_overflow_key_means_no_rate_limit():
    t = table(tokens={"hot": {}})
    assert all(t.route("track", "hot", T0) == "events" for _ in range(50_000))
    assert t._limiter is None and t.overflowed == {}


def test_bucket_admits_burst_then_overflows_then_refills():
    t = table(tokens={"hot": {"track": "ev_hot"}},
              overflow={"events_per_second": 10, "burst": 3})
    assert [t.route("track", "hot", T0) for _ in range(5)] == (
        ["ev_hot"] * 3 + ["ev_hot_overflow"] * 2)
    assert t.overflowed == {"ev_hot": 2}
    # half an interval later: still empty
    assert t.route("track", "hot", T0 + 0.05) == "ev_hot_overflow"
    # one interval after the burst: exactly one more record fits
    assert t.route("track", "hot", T0 + 0.1) == "ev_hot"
    assert t.route("track", "hot", T0 + 0.1) == "ev_hot_overflow"
    # idle long enough to refill completely: a full burst again, no more
    later = T0 + 60
    assert [t.route("track", "hot", later) for _ in range(4)] == (
        ["ev_hot"] * 3 + ["ev_hot_overflow"])
    assert t.overflowed == {"ev_hot": 5}


def test_steady_rate_is_admitted_and_excess_spills():
    t = table(overflow={"events_per_second": 100, "burst": 1})
    # 100/s exactly: all admitted
    assert all(t.route("track", "a", T0 + i / 100) == "events" for i in range(1000))
    # 200/s: after the first second, half spill
    out = [t.route("track", "b", T0 + i / 200) for i in range(2000)]
    assert out.count("events") == 1000 and out.count("events_overflow") == 1000


def test_buckets_are_per_token_and_shared_across_endpoints():
    t = table(overflow={"events_per_second": 1, "burst": 2, "suffix": "_spill"})
    assert t.route("track", "a", T0) == "events"
    assert t.route("engage", "a", T0) == "people"
    assert t.route("groups", "a", T0) == "groups_spill"
    assert t.route("track", "b", T0) == "events"      # b has its own bucket
    assert t.overflowed == {"groups": 1}


def test_overflow_defaults_for_absent_sub_keys():
    t = table(overflow={})
    lim = t._limiter
    assert (lim.rate, lim.burst, lim.max_tracked) == (1000.0, 2000, 100_000)
    assert t.route("track", "x", T0) == "events"
    assert t._spill["events"] == "events_overflow"
    t = table(overflow={"events_per_second": 5})
    assert t._limiter.burst == 10          # two seconds' worth of the rate
    t = table(overflow={"events_per_second": 0.1})
    assert t._limiter.burst == 1


def test_overflow_names_exist_for_every_reachable_queue():
    t = table(queues={"track": "ev"}, tokens={"a": {"engage": "pp_a"}}, overflow={})
    assert t._spill == {"ev": "ev_overflow", "pp_a": "pp_a_overflow",
                        "people": "people_overflow", "groups": "groups_overflow",
                        "imports": "imports_overflow"}


def _reference_decisions(rate, burst, events):
    """A plain token bucket in exact arithmetic: level refills at `rate`, capped at
    `burst`; a record takes one whole token or overflows."""
    level, last, out = {}, {}, []
    for token, now in events:
        lv = level.get(token, Fraction(burst))
        lv = min(Fraction(burst), lv + (now - last.get(token, now)) * rate)
        last[token] = now
        if lv >= 1:
            lv -= 1
            out.append(True)
        else:
            out.append(False)
        level[token] = lv
    return out


@settings(max_examples=300, deadline=None)
@example(rate=1, burst=1, steps=[("a", 0), ("a", 999)], origin=1000.0)  # 0.999 token < 1
@example(rate=10, burst=3, steps=[("a", 0)] * 4 + [("a", 100)] * 2, origin=EPOCH)
@given(rate=st.sampled_from([1, 2, 5, 10, 50, 1000, 5000]), burst=st.integers(1, 6),
       steps=st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 40_000)),
                      min_size=1, max_size=120),
       origin=st.sampled_from([1000.0, EPOCH, 1795662710.323164]))
def test_bucket_matches_an_exact_token_bucket_including_after_forgetting(
        rate, burst, steps, origin):
    """Gaps up to 40 s cross several 10 s generations, so forgotten tokens are covered;
    epoch-sized clocks (what time.time() gives) must decide exactly too.  Times are
    taken to the microsecond, so origins are whole microseconds here."""
    t = table(overflow={"events_per_second": rate, "burst": burst})
    now_ms, events, got = 0, [], []
    for token, gap_ms in steps:
        now_ms += gap_ms
        events.append((token, Fraction(now_ms, 1000)))
        got.append(t.route("track", token, origin + now_ms / 1000) == "events")
    assert got == _reference_decisions(rate, burst, events)


@pytest.mark.parametrize("rate", [1, 3, 7, 10, 1000, 5000, 99_999, 1_000_000])
@pytest.mark.parametrize("burst", [1, 2, 3, 100, 2000])
@pytest.mark.parametrize("now", [EPOCH, 1795662710.3231645, 5000.0, 0.0])
def test_a_burst_at_one_instant_admits_exactly_burst_records(rate, burst, now):
    """All records of one request share one `now`; float seconds used to drift here."""
    t = table(overflow={"events_per_second": rate, "burst": burst})
    out = [t.route("track", "a", now) for _ in range(burst + 2)]
    assert out == ["events"] * burst + ["events_overflow"] * 2


# ---- idle tokens are forgotten --------------------------------------------------------

def test_idle_tokens_are_forgotten_after_two_generations():
    t = table(overflow={"events_per_second": 10, "burst": 3})
    lim = t._limiter
    assert lim.generation_s == routing.MIN_GENERATION_S
    for i in range(1000):
        t.route("track", "tok%d" % i, T0)
    assert len(lim) == 1000
    t.route("track", "other", T0 + lim.generation_s)          # swap 1: all now "old"
    assert len(lim.young) == 1 and len(lim.old) == 1000
    t.route("track", "other", T0 + 2 * lim.generation_s)      # swap 2: dropped
    assert set(lim.young) == set(lim.old) == {"other"}


def test_a_token_used_in_each_generation_keeps_its_state():
    t = table(overflow={"events_per_second": 0.01, "burst": 2})   # 100 s per token
    lim = t._limiter
    assert lim.generation_s == 200.0                 # burst/rate > the 10 s floor
    assert [t.route("track", "a", T0) for _ in range(3)] == [
        "events", "events", "events_overflow"]
    for k in range(1, 5):        # one record per generation; the bucket still refills
        assert t.route("track", "a", T0 + 100.0 * k) == "events"
    assert t.route("track", "a", T0 + 400.0) == "events_overflow"


def test_max_tracked_tokens_bounds_state_and_keeps_hot_tokens():
    t = table(overflow={"events_per_second": 1, "burst": 2, "max_tracked_tokens": 50})
    lim = t._limiter
    assert t.route("track", "hot", T0) == "events"
    assert t.route("track", "hot", T0) == "events"
    for i in range(10_000):                      # a flood of distinct tokens
        t.route("track", "flood%d" % i, T0)
        assert len(lim) <= 100
        if i % 20 == 0:                          # the hot token keeps sending
            assert t.route("track", "hot", T0) == "events_overflow"


def test_clock_going_backwards_does_not_stall_a_token():
    t = table(overflow={"events_per_second": 10, "burst": 2})
    assert [t.route("track", "a", T0 + 3600) for _ in range(3)] == [
        "events", "events", "events_overflow"]
    # the clock jumps back an hour: the token starts afresh instead of waiting an hour
    assert [t.route("track", "a", T0) for _ in range(3)] == [
        "events", "events", "events_overflow"]


def test_after_the_clock_goes_back_idle_tokens_are_still_forgotten_on_time():
    t = table(overflow={"events_per_second": 10, "burst": 1})
    lim = t._limiter
    for i in range(100):
        t.route("track", "tok%d" % i, T0 + 3600)
    assert t.route("track", "tok0", T0) == "events"       # the clock stepped back
    t.route("track", "x", T0 + lim.generation_s)
    t.route("track", "x", T0 + 2 * lim.generation_s)
    assert set(lim.young) == set(lim.old) == {"x"}


def test_routing_known_tokens_allocates_nothing_after_warm_up():
    t = table(tokens={"t%d" % i: {"track": "q%d" % (i % 3)} for i in range(100)},
              overflow={"events_per_second": 80, "burst": 50})
    tokens = ["t%d" % i for i in range(100)]
    now = T0

    def run(n):
        nonlocal now
        for i in range(n):
            t.route("track", tokens[i % 100], now)
            now += 1e-4           # 10,000 records/s over 100 tokens: some spill
    tracemalloc.start()
    try:
        run(20_000)      # warm up under tracing: each token's stored number is replaced
        before = tracemalloc.get_traced_memory()[0]
        run(20_000)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert sum(t.overflowed.values()) > 0
    assert grown < 1000, grown       # a few stray objects at most, not per record


# ---- validation ---------------------------------------------------------------------------

BAD = [
    ([], "<dict>: <top level>: must be a JSON object, not an array"),
    ({"queue": {}}, "<dict>: queue: unknown key (expected one of queues, tokens,"),
    ({"a b": {}}, '<dict>: ["a b"]: unknown key (expected one of queues, tokens,'),
    ({"queues": []}, "<dict>: queues: must be a JSON object, not an array"),
    ({"queues": {"trak": "x"}}, "<dict>: queues.trak: unknown endpoint"),
    ({"queues": {"track": "a.b"}}, '<dict>: queues.track: queue name must be'),
    ({"queues": {"track": ""}}, '<dict>: queues.track: queue name must be'),
    ({"queues": {"track": "a b"}}, 'not "a b"'),
    ({"queues": {"track": "x" * 201}}, "<dict>: queues.track: queue name must be"),
    ({"queues": {"track": 3}}, "<dict>: queues.track: queue name must be a non-empty"
                               " string of at most 200 bytes without '.', '/', '~', spaces"
                               " or control characters, not 3"),
    ({"tokens": {"abc": {"track": "a/b"}}}, "<dict>: tokens.abc.track: queue name must be"),
    ({"tokens": {"abc": {"track": ["x"]}}}, "<dict>: tokens.abc.track: queue name must be"),
    ({"tokens": {"abc": "events"}}, "<dict>: tokens.abc: must be a JSON object, not a string"),
    ({"tokens": {"abc": {"decide": "x"}}}, "<dict>: tokens.abc.decide: unknown endpoint"),
    ({"tokens": {"": {}}}, '<dict>: tokens[""]: a token must be a non-empty string'),
    ({"tokens": {" abc": {}}}, '<dict>: tokens[" abc"]: token has leading or trailing'),
    ({"tokens": {"a.b": {"track": "~"}}}, '<dict>: tokens["a.b"].track: queue name'),
    ({"tokens": []}, "<dict>: tokens: must be a JSON object, not an array"),
    ({"secrets": {"abc": ""}}, "<dict>: secrets.abc: a secret must be a non-empty string"),
    ({"secrets": {"abc": 5}}, "<dict>: secrets.abc: a secret must be a non-empty string,"
                              " not a number"),
    ({"blocked_tokens": "abc"}, "<dict>: blocked_tokens: must be an array of tokens,"
                                " not a string"),
    ({"blocked_tokens": ["a", None]}, "<dict>: blocked_tokens[1]: a token must be a"
                                      " non-empty string, not null"),
    ({"blocked_tokens": ["a "]}, "<dict>: blocked_tokens[0]: token has leading"),
    ({"strict_tokens": 1}, "<dict>: strict_tokens: must be true or false, not a number"),
    ({"strict_tokens": "true"}, "<dict>: strict_tokens: must be true or false, not a string"),
    ({"overflow": True}, "<dict>: overflow: must be a JSON object, not a boolean"),
    ({"overflow": {"rate": 5}}, "<dict>: overflow.rate: unknown key"),
    ({"overflow": {"burst ": 5}}, '<dict>: overflow["burst "]: unknown key'),
    ({"overflow": {"events_per_second": 0}}, "<dict>: overflow.events_per_second: must be"
                                             " a positive number up to 1e+06, not 0"),
    ({"overflow": {"events_per_second": -1}}, "overflow.events_per_second: must be"),
    ({"overflow": {"events_per_second": float("inf")}}, "overflow.events_per_second:"),
    ({"overflow": {"events_per_second": "10"}}, 'overflow.events_per_second: must be a'
                                               ' positive number up to 1e+06, not "10"'),
    ({"overflow": {"events_per_second": True}}, "overflow.events_per_second: must be a"
                                               " positive number up to 1e+06, not a boolean"),
    ({"overflow": {"events_per_second": 1e6 + 1}}, "overflow.events_per_second: must be a"
                                                   " positive number up to 1e+06, not 1000001.0"),
    ({"overflow": {"burst": 0}}, "<dict>: overflow.burst: must be a positive integer, not 0"),
    ({"overflow": {"burst": 2.5}}, "overflow.burst: must be a positive integer, not 2.5"),
    ({"overflow": {"burst": True}}, "overflow.burst: must be a positive integer"),
    ({"overflow": {"max_tracked_tokens": 0}}, "overflow.max_tracked_tokens: must be a"),
    ({"overflow": {"suffix": ""}}, "<dict>: overflow.suffix: must be a non-empty string"),
    ({"overflow": {"suffix": ".x"}}, "<dict>: overflow.suffix: must be a non-empty string"),
    ({"queues": {"track": "e" * 195}, "overflow": {}},
     "<dict>: overflow.suffix: overflow queue for \"eee"),
    ({"queues": {"engage": "events_overflow"}, "overflow": {}},
     '<dict>: overflow.suffix: overflow queue "events_overflow" is also a normal queue'
     " (queues.engage)"),
    ({"tokens": {"a": {"track": "x_o"}, "b": {"track": "x"}}, "overflow": {"suffix": "_o"}},
     '<dict>: overflow.suffix: overflow queue "x_o" is also a normal queue (tokens.a.track)'),
]


@pytest.mark.parametrize("data, message", BAD, ids=["bad%d" % i for i in range(len(BAD))])
def test_invalid_dicts_are_rejected_naming_the_key(data, message):
    with pytest.raises(RoutesError) as info:
        RoutingTable.from_dict(data)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_overflow_is_not_checked_against_unused_default_queue_names():
    # "events" is replaced for /track, so "events" + suffix may be a real queue name
    t = table(queues={"track": "ev", "engage": "events_overflow"}, overflow={})
    assert t.route("engage", "x", T0) == "events_overflow"


def test_blocked_token_may_also_appear_in_tokens_and_secrets():
    t = table(tokens={"a": {}}, secrets={"a": "s"}, blocked_tokens=["a", "a"])
    assert t.route("track", "a", T0) is BLOCKED
    assert t.secret("a") == "s"


# ---- files ----------------------------------------------------------------------------

FULL = {"queues": {"track": "events", "engage": "people", "groups": "groups",
                   "import": "imports"},
        "tokens": {"tok_acme": {"track": "events_acme", "engage": "people_acme"}},
        "secrets": {"tok_acme": "acme-secret"},
        "blocked_tokens": ["tok_bad"],
        "overflow": {"events_per_second": 1000, "burst": 2000, "suffix": "_overflow"},
        "strict_tokens": False}


def write(tmp_path, text, name="routes.json"):
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return str(path)


def test_from_file_with_every_key(tmp_path):
    path = write(tmp_path, json.dumps(FULL, indent=2))
    t = RoutingTable.from_file(path)
    assert t.source == path
    assert t.route("track", "tok_acme", T0) == "events_acme"
    assert t.route("engage", "tok_acme", T0) == "people_acme"
    assert t.route("import", "tok_acme", T0) == "imports"
    assert t.route("track", "tok_bad", T0) is BLOCKED
    assert t.route("track", "zzz", T0) == "events"
    assert t.secret("tok_acme") == "acme-secret"


def test_from_file_accepts_a_utf8_bom(tmp_path):
    path = write(tmp_path, b"\xef\xbb\xbf" + b'{"queues": {"track": "\xc3\xa9v"}}')
    assert RoutingTable.from_file(path).route("track", "x", T0) == "\u00e9v"


BAD_FILES = [
    ('{\n  "queues": {"track": "ev"}\n  "tokens": {}\n}', ":3:3: invalid JSON: Expecting ','"
                                                         " delimiter"),
    ("", ":1:1: invalid JSON: Expecting value"),
    ('{"tokens": {"a": {}, "a": {"track": "x"}}}', ': tokens: duplicate key "a"'),
    ('{"tokens": {"a": {"track": "x", "track": "y"}}}', ': tokens.a: duplicate key "track"'),
    ('{"queues": {}, "queues": {}}', ': <top level>: duplicate key "queues"'),
    ('{"overflow": {"events_per_second": NaN}}', ": invalid JSON: NaN is not allowed"),
    ('{"overflow": {"burst": Infinity}}', ": invalid JSON: Infinity is not allowed"),
    (b'{"tokens":\n {"\xff": {}}}', ":2: not UTF-8 (byte 0xff at offset 14)"),
    ('{"tokens": {"abc": {"track": "a.b"}}}', ": tokens.abc.track: queue name must be"),
    ('[1, 2]', ": <top level>: must be a JSON object, not an array"),
    ("[" * 100_000 + "]" * 100_000, ": invalid JSON: nested too deeply"),
]


@pytest.mark.parametrize("text, message", BAD_FILES,
                         ids=["badfile%d" % i for i in range(len(BAD_FILES))])
def test_broken_files_name_file_and_line_or_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(RoutesError) as info:
        RoutingTable.from_file(path)
    assert str(info.value).startswith(path)
    assert message in str(info.value), str(info.value)


@pytest.mark.parametrize("text", [
    '{"tokens": {}, "overflow": {}, "secrets": {}, "queues": {}, "blocked_tokens": ["x"]}',
    '{"tokens": {"a": {}, "b": {}}, "overflow": {}, "blocked_tokens": ["x"]}',
])
def test_empty_objects_shared_by_the_parser_stay_independent(tmp_path, text):
    t = RoutingTable.from_file(write(tmp_path, text))
    assert t.route("track", "x", T0) is BLOCKED
    assert t.route("track", "a", T0) == "events"
    assert t._limiter.settings() == (1000.0, 2000, 100_000)
    assert t.secret("x") is None


def test_from_dict_does_not_modify_its_input():
    data = {"tokens": {"a": {"track": "q"}}, "blocked_tokens": ["b"], "secrets": {"c": "s"}}
    before = json.dumps(data, sort_keys=True)
    t = RoutingTable.from_dict(data)
    assert json.dumps(data, sort_keys=True) == before
    assert t._rows is not data["tokens"]


def test_missing_file_is_a_routes_error(tmp_path):
    path = str(tmp_path / "nope.json")
    with pytest.raises(RoutesError) as info:
        RoutingTable.from_file(path)
    assert str(info.value) == "%s: cannot read: No such file or directory" % path


def test_equal_token_entries_from_a_file_share_rows(tmp_path):
    entries = {"t%d" % i: {"track": "q%d" % (i % 2)} for i in range(10)}
    t = RoutingTable.from_file(write(tmp_path, json.dumps({"tokens": entries})))
    assert len({id(row) for row in t._rows.values()}) == 2


# ---- Router and reload ----------------------------------------------------------------

class ListLog:
    def __init__(self):
        self.lines = []

    def _add(self, level, msg, *args, exc_info=False):
        self.lines.append((level, msg % args) + (("exc_info",) if exc_info else ()))

    def info(self, msg, *args, **kw):
        self._add("info", msg, *args, **kw)

    def error(self, msg, *args, **kw):
        self._add("error", msg, *args, **kw)


def test_router_without_a_file_uses_defaults_and_reload_is_a_no_op():
    log = ListLog()
    r = Router(log=log)
    first = r.table
    assert r.table.route("track", "x", T0) == "events"
    assert r.reload() is True
    assert r.table is first
    assert log.lines == [("info", "routes: no routes file, nothing to reload")]


def test_router_refuses_a_broken_file_at_start(tmp_path):
    with pytest.raises(RoutesError):
        Router(write(tmp_path, "{"))


def test_reload_swaps_in_a_new_table(tmp_path):
    path = write(tmp_path, json.dumps({"tokens": {"a": {"track": "q1"}}}))
    log = ListLog()
    r = Router(path, log=log)
    old = r.table
    assert old.route("track", "a", T0) == "q1"
    write(tmp_path, json.dumps({"tokens": {"a": {"track": "q2"}}, "blocked_tokens": ["b"]}))
    assert r.reload() is True
    assert r.table is not old
    assert r.table.route("track", "a", T0) == "q2"
    assert r.table.route("track", "b", T0) is BLOCKED
    assert old.route("track", "a", T0) == "q1"      # a reference taken earlier still works
    assert r.reloads == 1
    assert log.lines == [("info", "routes: loaded %s (2 tokens, overflow state reset)" % path)]


@pytest.mark.parametrize("broken, reason", [
    ('{"tokens": {"a": {"track": "q/2"}}}', ": tokens.a.track: queue name must be"),
    ('{"tokens": ', ":1:12: invalid JSON: Expecting value"),
    (None, ": cannot read: No such file or directory"),
])
def test_reload_of_a_broken_file_keeps_the_last_good_table(tmp_path, broken, reason):
    path = write(tmp_path, json.dumps({"tokens": {"a": {"track": "q1"}}}))
    log = ListLog()
    r = Router(path, log=log)
    good = r.table
    if broken is None:
        (tmp_path / "routes.json").unlink()
    else:
        write(tmp_path, broken)
    assert r.reload() is False
    assert r.table is good
    assert r.table.route("track", "a", T0) == "q1"
    assert r.reload_failures == 1 and r.reloads == 0
    [(level, line)] = log.lines
    assert level == "error"
    assert line.startswith("routes: reload failed, keeping the last good table: " + path)
    assert reason in line


def test_reload_survives_an_unexpected_error(tmp_path, monkeypatch):
    path = write(tmp_path, "{}")
    log = ListLog()
    r = Router(path, log=log)
    good = r.table

    def boom(cls, path):
        raise MemoryError()
    monkeypatch.setattr(RoutingTable, "from_file", classmethod(boom))
    assert r.reload() is False
    assert r.table is good and r.reload_failures == 1
    assert log.lines == [("error", "routes: reload of %s failed unexpectedly, keeping the"
                                   " last good table" % path, "exc_info")]


def test_reload_keeps_counters_and_bucket_state_when_rate_is_unchanged(tmp_path):
    data = {"blocked_tokens": ["b"], "overflow": {"events_per_second": 1, "burst": 2}}
    path = write(tmp_path, json.dumps(data))
    r = Router(path, log=ListLog())
    assert [r.table.route("track", "a", T0) for _ in range(3)] == [
        "events", "events", "events_overflow"]
    r.table.route("track", "b", T0)
    r.table.route("track", "zz", T0)
    data["overflow"]["suffix"] = "_later"           # suffix change keeps the state
    write(tmp_path, json.dumps(data))
    assert r.reload() is True
    assert r.table.route("track", "a", T0) == "events_later"   # still empty
    assert r.table.overflowed == {"events": 2}
    assert r.table.blocked == 1
    assert r.table.unknown == 3 + 1 + 1       # a, a, a, zz, then a again
    assert r.log.lines[-1][1].endswith("(1 tokens, overflow state kept)")


def test_reload_resets_bucket_state_when_rate_changes(tmp_path):
    path = write(tmp_path, json.dumps({"overflow": {"events_per_second": 1, "burst": 1}}))
    r = Router(path, log=ListLog())
    assert [r.table.route("track", "a", T0) for _ in range(2)] == [
        "events", "events_overflow"]
    write(tmp_path, json.dumps({"overflow": {"events_per_second": 1, "burst": 3}}))
    assert r.reload() is True
    assert [r.table.route("track", "a", T0) for _ in range(4)] == [
        "events", "events", "events", "events_overflow"]
    assert r.table.overflowed == {"events": 2}


def test_reload_can_run_the_parse_through_a_runner(tmp_path):
    path = write(tmp_path, json.dumps({"queues": {"track": "ev1"}}))
    r = Router(path, log=ListLog())
    write(tmp_path, json.dumps({"queues": {"track": "ev2"}}))
    calls = []

    def runner(fn, *args):
        calls.append(args)
        return fn(*args)
    assert r.reload(run=runner) is True
    assert calls == [(path,)]
    assert r.table.route("track", "x", T0) == "ev2"
    write(tmp_path, "{")
    assert r.reload(run=runner) is False
    assert r.table.route("track", "x", T0) == "ev2"


def test_install_takes_a_table_built_elsewhere():
    log = ListLog()
    r = Router(log=log)
    r.table.route("track", "x", T0)
    new = RoutingTable.from_dict({"queues": {"track": "ev2"}}, source="built-elsewhere")
    r.install(new)
    assert r.table is new
    assert r.table.route("track", "x", T0) == "ev2"
    assert r.table.unknown == 2
    assert log.lines == [("info", "routes: loaded built-elsewhere (0 tokens,"
                                  " overflow state reset)")]


def test_router_logs_through_the_module_logger_by_default(tmp_path, caplog):
    path = write(tmp_path, "{}")
    r = Router(path)
    write(tmp_path, "{")
    with caplog.at_level(logging.INFO, logger="ingest.routing"):
        assert r.reload() is False
    assert "keeping the last good table" in caplog.text
