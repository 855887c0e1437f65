"""clean.py: the record contract (DESIGN.md) and the cleaning rules of issue 3.

Each rejection is checked for its stable reason, the field it names and its message,
because the verbose answer and the strict `failed_records` are built from them.
"""
import copy
import json

import pytest

from ingest import clean
from ingest.clean import Context
from ingest.errors import RecordRejected

from .golden.harness import call, form, make

NOW = 1_800_000_000.123
DAY = 86400


def ctx(ip=None, max_properties=255, now=NOW, **limits):
    return Context(now, ip, max_properties, **limits)


def event(**props):
    props.setdefault("token", "tok")
    return {"event": "Signed Up", "properties": props}


def rejected(fn, record, *args, **kw):
    with pytest.raises(RecordRejected) as info:
        fn(record, *args, **kw)
    return info.value.reason, info.value.field, info.value.message


def track(record, **kw):
    return clean.clean_event(record, ctx(**kw))


def imp(record, **kw):
    return clean.clean_event(record, ctx(**kw), importing=True)


# ---- /track -------------------------------------------------------------------------------

def test_context_arrival_time_in_integer_ms():
    assert ctx().now_ms == 1_800_000_000_123
    assert isinstance(ctx().now_ms, int)


def test_good_event_gets_time_and_processing_time_and_keeps_everything_else():
    record = event(distinct_id="u1", plan="pro", nested={"a": [1, 2]})
    assert track(record) == "tok"
    assert record == {"event": "Signed Up", "properties": {
        "token": "tok", "distinct_id": "u1", "plan": "pro", "nested": {"a": [1, 2]},
        "time": 1_800_000_000.123, "mp_processing_time_ms": 1_800_000_000_123}}


def test_seconds_time_is_kept_as_sent():
    record = event(time=1_799_999_000.5)
    track(record)
    assert record["properties"]["time"] == 1_799_999_000.5


def test_integer_milliseconds_become_seconds():
    record = event(time=1_799_999_000_250)
    track(record)
    assert record["properties"]["time"] == 1_799_999_000.25


def test_time_at_the_ms_threshold_is_seconds():
    # 1e11 s is year 5138: not milliseconds, but far in the future, so it is clamped.
    record = event(time=100_000_000_000)
    track(record)
    assert record["properties"]["time"] == round(NOW, 3)


def test_time_less_than_an_hour_ahead_is_kept_and_later_is_clamped():
    near, far = event(time=NOW + 3600), event(time=NOW + 3601)
    track(near)
    track(far)
    assert near["properties"]["time"] == NOW + 3600
    assert far["properties"]["time"] == 1_800_000_000.123


def test_five_days_old_is_accepted_and_older_is_rejected():
    ok = event(time=NOW - 5 * DAY)
    track(ok)
    assert ok["properties"]["time"] == NOW - 5 * DAY
    assert rejected(clean.clean_event, event(time=NOW - 5 * DAY - 1), ctx()) == (
        "time_too_old", "properties.time",
        "properties.time is more than 5 days old (use /import)")


def test_old_time_in_milliseconds_is_rejected_too():
    assert rejected(clean.clean_event, event(time=int((NOW - 6 * DAY) * 1000)), ctx())[0] == \
        "time_too_old"


@pytest.mark.parametrize("bad", ["1799999999", True, [1], {"t": 1}])
def test_time_must_be_a_number(bad):
    assert rejected(clean.clean_event, event(time=bad), ctx()) == (
        "invalid_time", "properties.time", "properties.time must be a number")


def test_time_integer_too_large_for_a_float_is_rejected():
    assert rejected(clean.clean_event, event(time=10 ** 400), ctx())[0:2] == (
        "invalid_time", "properties.time")


def test_ip_from_context_is_added_only_when_absent():
    record = event()
    track(record, ip="198.51.100.4")
    assert record["properties"]["ip"] == "198.51.100.4"
    for explicit in ("192.0.2.1", 0, "0"):
        record = event(ip=explicit)
        track(record, ip="198.51.100.4")
        assert record["properties"]["ip"] == explicit


def test_no_ip_without_ip_1():
    record = event()
    track(record)
    assert "ip" not in record["properties"]


@pytest.mark.parametrize("record, want", [
    ([], ("not_an_object", "record", "record is not a JSON object")),
    ("x", ("not_an_object", "record", "record is not a JSON object")),
    (None, ("not_an_object", "record", "record is not a JSON object")),
    ({"properties": {"token": "t"}}, ("invalid_event", "event", "event is missing")),
    ({"event": "", "properties": {"token": "t"}},
     ("invalid_event", "event", "event must be a non-empty string")),
    ({"event": 5, "properties": {"token": "t"}},
     ("invalid_event", "event", "event must be a non-empty string")),
    ({"event": "e"}, ("invalid_properties", "properties", "properties is missing")),
    ({"event": "e", "properties": [1]},
     ("invalid_properties", "properties", "properties must be an object")),
    ({"event": "e", "properties": {}},
     ("missing_token", "properties.token", "properties.token is missing")),
    ({"event": "e", "properties": {"token": ""}},
     ("missing_token", "properties.token", "properties.token must be a non-empty string")),
    ({"event": "e", "properties": {"token": 12}},
     ("missing_token", "properties.token", "properties.token must be a non-empty string")),
])
def test_track_rejections(record, want):
    before = copy.deepcopy(record)
    assert rejected(clean.clean_event, record, ctx()) == want
    assert record == before     # a rejected record is not half-cleaned


def test_property_count_limit_is_inclusive():
    props = {"p%d" % i: i for i in range(4)}
    ok = event(**dict(list(props.items())[:3]))           # token + 3 = 4 keys
    assert clean.clean_event(ok, ctx(max_properties=4)) == "tok"
    assert rejected(clean.clean_event, event(**props), ctx(max_properties=4)) == (
        "too_many_properties", "properties", "properties has more than 4 keys")


# ---- /import ------------------------------------------------------------------------------

def imp_event(**props):
    base = {"time": NOW - 30 * DAY, "distinct_id": "u1", "$insert_id": "abc123"}
    base.update(props)
    return event(**base)


def test_import_accepts_old_events_and_converts_ms():
    old = imp_event(time=1_000_000_000)
    assert imp(old) == "tok"
    assert old["properties"]["time"] == 1_000_000_000
    assert old["properties"]["mp_processing_time_ms"] == 1_800_000_000_123
    ms = imp_event(time=1_000_000_000_500)
    imp(ms)
    assert ms["properties"]["time"] == 1_000_000_000.5


def test_import_numeric_distinct_id_is_fine():
    assert imp(imp_event(distinct_id=42)) == "tok"


@pytest.mark.parametrize("props, want", [
    ({"time": None}, ("missing_time", "properties.time", "properties.time is missing")),
    ({"distinct_id": None},
     ("missing_distinct_id", "properties.distinct_id", "properties.distinct_id is missing")),
    ({"distinct_id": ""},
     ("missing_distinct_id", "properties.distinct_id", "properties.distinct_id is missing")),
    ({"$insert_id": None},
     ("missing_insert_id", "properties.$insert_id", "properties.$insert_id is missing")),
    ({"$insert_id": 7},
     ("missing_insert_id", "properties.$insert_id", "properties.$insert_id is missing")),
    ({"time": 31_535_999},
     ("time_too_old", "properties.time", "properties.time is before 1971")),
    ({"time": NOW + 3601}, ("time_in_future", "properties.time",
                            "properties.time is more than an hour in the future")),
    ({"time": "yesterday"},
     ("invalid_time", "properties.time", "properties.time must be a number")),
])
def test_import_rejections(props, want):
    record = imp_event()
    for key, value in props.items():
        if value is None:
            del record["properties"][key]
        else:
            record["properties"][key] = value
    assert rejected(clean.clean_event, record, ctx(), importing=True) == want


def test_import_boundaries_1971_and_one_hour_ahead_are_accepted():
    assert imp(imp_event(time=31_536_000)) == "tok"
    record = imp_event(time=NOW + 3600)
    imp(record)
    assert record["properties"]["time"] == NOW + 3600      # not clamped on import


def test_cleaner_for_import_requires_import_fields():
    assert clean.cleaner("import")(imp_event(), ctx()) == "tok"
    assert rejected(clean.cleaner("import"), event(), ctx())[0] == "missing_distinct_id"


# ---- /engage and /groups -----------------------------------------------------------------

OP_VALUES = {"$set": {"a": 1}, "$set_once": {"a": 1}, "$add": {"n": 2}, "$append": {"l": 1},
             "$union": {"l": [1]}, "$remove": {"l": 1}, "$unset": ["a"], "$delete": "",
             "$merge": {"prefs": {"theme": "dark"}}}


def profile(op="$set", **extra):
    record = {"$token": "tok", "$distinct_id": "u1", op: OP_VALUES[op]}
    record.update(extra)
    return record


def group(op="$set", **extra):
    record = {"$token": "tok", "$group_key": "company", "$group_id": "acme",
              op: OP_VALUES[op]}
    record.update(extra)
    return record


@pytest.mark.parametrize("op", clean.ENGAGE_OPS)
def test_every_engage_operation(op):
    record = profile(op, **{"$time": 1_799_999_000.5, "$ignore_time": True, "$ip": "1.2.3.4",
                            "$ignore_alias": False})
    before = copy.deepcopy(record)
    assert clean.clean_engage(record, ctx(ip="9.9.9.9")) == "tok"
    assert record == before        # modifiers kept, explicit $ip wins, nothing added


def test_engage_gets_ip_when_asked_and_absent():
    record = profile()
    clean.clean_engage(record, ctx(ip="9.9.9.9"))
    assert record == {"$token": "tok", "$distinct_id": "u1", "$set": {"a": 1}, "$ip": "9.9.9.9"}
    plain = profile()
    clean.clean_engage(plain, ctx())
    assert "$ip" not in plain


def test_engage_delete_value_is_ignored_and_numeric_distinct_id_is_fine():
    assert clean.clean_engage({"$token": "t", "$distinct_id": 5, "$delete": None}, ctx()) == "t"


@pytest.mark.parametrize("record, want", [
    ({"$distinct_id": "u", "$set": {}}, ("missing_token", "$token", "$token is missing")),
    ({"$token": "", "$distinct_id": "u", "$set": {}},
     ("missing_token", "$token", "$token must be a non-empty string")),
    ({"$token": "t", "$set": {}}, ("missing_distinct_id", "$distinct_id",
                                  "$distinct_id is missing")),
    ({"$token": "t", "$distinct_id": "", "$set": {}},
     ("missing_distinct_id", "$distinct_id", "$distinct_id is missing")),
    ({"$token": "t", "$distinct_id": "u"},
     ("invalid_operation", "operation",
      "expected exactly one of $set $set_once $add $append $union $remove $unset $delete"
      " $merge, got none")),
    ({"$token": "t", "$distinct_id": "u", "$set": {}, "$unset": []},
     ("invalid_operation", "operation",
      "expected exactly one of $set $set_once $add $append $union $remove $unset $delete"
      " $merge, got $set $unset")),
    ({"$token": "t", "$distinct_id": "u", "$set": [1]},
     ("invalid_operation", "$set", "$set must be an object")),
    ({"$token": "t", "$distinct_id": "u", "$unset": {"a": 1}},
     ("invalid_operation", "$unset", "$unset must be an array")),
    ("not a record", ("not_an_object", "record", "record is not a JSON object")),
])
def test_engage_rejections(record, want):
    assert rejected(clean.clean_engage, record, ctx()) == want


# What each official SDK sends to /engage and /groups, as it sends it (the wire shapes are in
# tests/unit/golden/phone_*, py_*, node_*, hand_browser_*): every one is accepted as sent.
SDK_UPDATES = [
    ("android People.merge()", "engage", "$merge", {"prefs": {"theme": "dark", "n": 1}}),
    ("android deleteUser()", "engage", "$delete", None),
    ("swift/iphone deleteUser()", "engage", "$delete", {}),
    ("react-native deleteUser()", "engage", "$delete", "null"),
    ("python/node delete", "engage", "$delete", ""),
    ("trackCharge()", "engage", "$append", {"$transactions": {"$amount": 9.99,
                                                             "$time": "2026-11-26T00:26:38"}}),
    ("python clear_charges", "engage", "$unset", ["$transactions"]),
    ("node/swift clear_charges", "engage", "$set", {"$transactions": []}),
    ("android remove()", "engage", "$remove", {"tags": "trial"}),
    ("android deleteGroup()", "groups", "$delete", None),
    ("swift/iphone deleteGroup()", "groups", "$delete", {}),
    ("react-native deleteGroup()", "groups", "$delete", "null"),
    ("android group unset()", "groups", "$unset", ["old"]),
    ("android group union()", "groups", "$union", {"regions": ["eu"]}),
]


@pytest.mark.parametrize("sdk, endpoint, op, value", SDK_UPDATES,
                         ids=[u[0] for u in SDK_UPDATES])
def test_every_operation_an_sdk_sends_is_accepted_as_sent(sdk, endpoint, op, value):
    build, fn = (profile, clean.clean_engage) if endpoint == "engage" else (group, clean.clean_group)
    record = build(**{"$time": 1_799_999_000_123})
    del record["$set"]
    record[op] = copy.deepcopy(value)
    before = copy.deepcopy(record)
    assert fn(record, ctx()) == "tok"
    assert record == before


# What no SDK sends stays refused, with a reason that names what was found.
GROUPS_EXPECTED = "expected exactly one of $set $set_once $union $remove $unset $delete"


@pytest.mark.parametrize("fn, record, want", [
    (clean.clean_group, group("$merge"), ("operation", GROUPS_EXPECTED + ", got $merge")),
    (clean.clean_group, group("$add"), ("operation", GROUPS_EXPECTED + ", got $add")),
    (clean.clean_group, group("$set", **{"$add": {"n": 1}}),
     ("operation", GROUPS_EXPECTED + ", got $set $add")),
    (clean.clean_engage, profile("$set", **{"$merge": {"a": {}}}),
     ("operation", "expected exactly one of $set $set_once $add $append $union $remove $unset"
                   " $delete $merge, got $set $merge")),
    (clean.clean_engage, {"$token": "t", "$distinct_id": "u", "$merge": ["a"]},
     ("$merge", "$merge must be an object")),
])
def test_operations_no_sdk_sends_are_rejected_with_the_reason(fn, record, want):
    assert rejected(fn, record, ctx()) == ("invalid_operation",) + want


def test_the_reason_reaches_the_verbose_answer_and_nothing_is_queued():
    app, sink = make()
    data = '[{"$token":"t","$group_key":"k","$group_id":"g","$add":{"n":1}}]'
    r = call(app, "POST", "/groups/", "verbose=1", form(data=data),
             "application/x-www-form-urlencoded")
    assert (r.status, json.loads(r.body)) == (200, {
        "status": 0, "error": "record 0: " + GROUPS_EXPECTED + ", got $add"})
    assert sink.items == []


def test_engage_operation_size_limit():
    record = {"$token": "t", "$distinct_id": "u", "$set": {"k%d" % i: i for i in range(3)}}
    assert rejected(clean.clean_engage, record, ctx(max_properties=2)) == (
        "too_many_properties", "$set", "$set has more than 2 keys")
    assert clean.clean_engage(record, ctx(max_properties=3)) == "t"


@pytest.mark.parametrize("op", clean.GROUP_OPS)
def test_every_group_operation(op):
    record = group(op)
    assert clean.clean_group(record, ctx(ip="9.9.9.9")) == "tok"
    assert record["$ip"] == "9.9.9.9"


@pytest.mark.parametrize("op", ["$add", "$append"])
def test_groups_have_no_add_or_append(op):
    assert rejected(clean.clean_group, group(op), ctx())[0:2] == ("invalid_operation",
                                                                 "operation")


@pytest.mark.parametrize("missing", ["$group_key", "$group_id"])
def test_groups_need_key_and_id(missing):
    record = group()
    del record[missing]
    assert rejected(clean.clean_group, record, ctx()) == (
        "missing_" + missing[1:], missing, "%s is missing" % missing)


def test_cleaner_names():
    assert clean.cleaner("track") is clean.clean_track    # clean_event without importing
    assert clean.cleaner("engage") is clean.clean_engage
    assert clean.cleaner("groups") is clean.clean_group
    with pytest.raises(KeyError):
        clean.cleaner("decide")


# ---- value limits (settings.max_depth, settings.max_string_chars) ---------------------------

def deep(levels):
    value = "leaf"
    for _ in range(levels):
        value = [value]
    return value


def test_nesting_up_to_max_depth_is_kept_and_deeper_is_rejected():
    assert clean.clean_event(event(x=deep(3)), ctx(max_depth=3)) == "tok"
    assert clean.clean_event(event(x={"a": {"b": {"c": 1}}}), ctx(max_depth=3)) == "tok"
    reason, field, _ = rejected(clean.clean_event, event(x=deep(4)), ctx(max_depth=3))
    assert (reason, field) == ("too_deep", "properties")
    reason, field, _ = rejected(clean.clean_event, event(x={"a": {"b": {"c": {}}}}),
                                ctx(max_depth=3))
    assert (reason, field) == ("too_deep", "properties")


def test_strings_up_to_max_string_are_kept_and_longer_are_rejected():
    assert clean.clean_event(event(s="x" * 8, l=["y" * 8]), ctx(max_string=8)) == "tok"
    for bad in (event(s="x" * 9), event(l=["y" * 9]), event(d={"k": {"k": "z" * 9}})):
        reason, field, _ = rejected(clean.clean_event, bad, ctx(max_string=8))
        assert (reason, field) == ("string_too_long", "properties")


def test_profile_operation_values_obey_the_same_limits():
    record = {"$token": "t", "$distinct_id": "u", "$set": {"a": deep(3)}}
    assert clean.clean_engage(record, ctx(max_depth=3)) == "t"
    record = {"$token": "t", "$distinct_id": "u", "$set": {"a": deep(4)}}
    assert rejected(clean.clean_engage, record, ctx(max_depth=3))[0:2] == ("too_deep", "$set")
    record = {"$token": "t", "$group_key": "k", "$group_id": "g", "$union": {"a": ["x" * 9]}}
    assert rejected(clean.clean_group, record, ctx(max_string=8))[0:2] == (
        "string_too_long", "$union")


def test_limits_cover_top_level_keys_beyond_properties():
    deep = "x"
    for _ in range(30):
        deep = [deep]
    record = event()
    record["extra"] = deep
    assert rejected(clean.clean_event, record, ctx(max_depth=20))[:2] == ("too_deep", "extra")
    record = event()
    record["note"] = "n" * 101
    assert rejected(clean.clean_event, record, ctx(max_string=100, data_chars=10 ** 6))[:2] \
        == ("string_too_long", "note")


def test_limits_cover_update_keys_beside_the_operation():
    record = {"$token": "t", "$distinct_id": "d", "$set": {"a": 1}, "$ip": "1" * 101}
    assert rejected(clean.clean_engage, record, ctx(max_string=100, data_chars=10 ** 6))[:2] \
        == ("string_too_long", "$ip")


# ---- the /track fast path is only fast ---------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ingest.clean import _clean_event_checked, clean_event  # noqa: E402

_scalar = st.one_of(st.none(), st.booleans(), st.integers(-10 ** 16, 10 ** 16),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=5),
                    st.sampled_from([1795662710, 1795662710123, 1795000000.5, 10 ** 15,
                                     10 ** 15 - 1, -10 ** 15 + 1, 10 ** 11, 10 ** 11 + 1,
                                     1e11, 100000000000.5, -1, "1795662710", True]))
_value = st.recursive(_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=3)),
    max_leaves=8)
# Mostly valid events (so the fast path is taken), with every kind of damage mixed in.
_props = st.one_of(
    st.fixed_dictionaries({"token": st.one_of(st.just("tok"), _scalar)},
                          optional={"time": _value, "ip": _value, "distinct_id": _value,
                                    "a": _value, "b": _value}),
    st.dictionaries(st.sampled_from(["token", "time", "ip", "a"]), _value, max_size=5))
_records = st.one_of(_value, st.fixed_dictionaries(
    {"event": st.one_of(st.just("Signed Up"), _scalar), "properties": st.one_of(_props, _scalar)},
    optional={"extra": _value}))


def _outcome(fn, record, ctx):
    import copy
    record = copy.deepcopy(record)
    try:
        return "ok", fn(record, ctx), record
    except RecordRejected as exc:
        return "rejected", (exc.reason, exc.field, exc.message), record


@settings(max_examples=400, deadline=None)
@given(_records, st.sampled_from([None, "203.0.113.9"]), st.integers(1, 300))
def test_the_track_fast_path_cleans_as_the_full_checks_do(record, ip, max_string):
    ctx = Context(1795662710.123456, ip, max_properties=4, max_depth=2, max_string=max_string,
                  data_chars=200)
    assert _outcome(clean_event, record, ctx) == \
        _outcome(lambda r, c: _clean_event_checked(r, c, False), record, ctx)


@pytest.mark.parametrize("t", [10 ** 11, 10 ** 11 + 1, 1e11, 100000000000.5, 10 ** 15 - 1,
                               10 ** 15, -10 ** 15 + 1, -10 ** 15, 1e15, -1e15, 1795662710,
                               1795662710123, 1795662710123.5, 1795662711, True, 0, -0.0])
def test_the_track_fast_path_reads_times_at_the_bounds_as_the_full_checks_do(t):
    """Integer times are compared with integer bounds on the fast path (clean.py PERF):
    the same numbers, so every time at and around them gets the same outcome and type."""
    ctx = Context(1795662710.123456, None, data_chars=200)
    record = {"event": "e", "properties": {"token": "t", "time": t}}
    fast = _outcome(clean_event, record, ctx)
    checked = _outcome(lambda r, c: _clean_event_checked(r, c, False), record, ctx)
    assert fast == checked
    if fast[0] == "ok":     # 1.0 == 1, but they are written differently
        assert type(fast[2]["properties"]["time"]) is type(checked[2]["properties"]["time"])


@pytest.mark.parametrize("fillers", [0, 1, 30])
def test_a_deep_event_is_refused_whatever_records_surround_it(fillers):
    """The depth checks are skipped only when the request's brackets prove every event
    shallow (decode.nesting_bound): records without brackets cannot hide a deep one."""
    deep = {"a": 1}
    for _ in range(21):                       # max_depth is 20 below properties
        deep = {"d": deep}
    events = [1] * fillers + [{"event": "e", "properties": {"token": "t", "x": deep}}]
    events += [{"event": "e", "properties": {"token": "t"}}]
    app, sink = make()
    r = call(app, "POST", "/track", "verbose=1",
             form(data=json.dumps(events, separators=(",", ":"))),
             "application/x-www-form-urlencoded")
    body = json.loads(r.body)
    assert body["status"] == 1
    if not fillers:
        assert "nested deeper than 20 levels" in body["error"]
    assert [json.loads(p)["properties"].get("x") for _, p in sink.items] == [None]


def test_nesting_bound_counts_two_brackets_per_event_only():
    events = [{"event": "e", "properties": {"t": 1}}, 1, {"event": "e", "properties": 2}]
    text = json.dumps(events)
    from ingest import decode
    bound = decode.nesting_bound(events, text.count("{") + text.count("["))
    assert bound == 4 - 2          # 3 braces and the array's bracket, one shaped event
