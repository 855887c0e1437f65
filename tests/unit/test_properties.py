"""Property tests (hypothesis): whatever arrives, each stage answers in its own terms.

- decode: a list of records, or IngestError; and every encoding the SDKs use round-trips.
- clean: a non-empty token string, or RecordRejected.
- the app: an allowed status (never 500) with a Content-Length equal to the body, under
  wsgiref.validate (golden.harness.check); valid records always come out as queue items.
Integers here stay within 64 bits: the unbounded cases are explicit tests in
test_app.py/test_clean.py, kept out of here so this file stays deterministic.
"""
import base64
import json
import string
from urllib.parse import quote

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest import clean, decode
from ingest.errors import IngestError, RecordRejected

from .golden.harness import NOW, NOW_MS, call, gz, make

# derandomize: the same examples every run (no flaky CI), and no example database on disk.
FAST = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

scalars = (st.none() | st.booleans() | st.integers(-2 ** 63, 2 ** 63)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)
keys = st.sampled_from(["event", "properties", "token", "time", "distinct_id", "$insert_id",
                        "ip", "$token", "$distinct_id", "$group_key", "$group_id", "$set",
                        "$unset", "$delete", "$add", "$union", "$ip", "$time"]) | st.text(
                            max_size=6)
# Record-shaped values: the keys the cleaners look at, with values of any type.
recordish = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                         | st.dictionaries(keys, inner, max_size=6), max_leaves=16)
times = (st.none() | st.floats(NOW - 10 * 86400, NOW + 10 * 86400)
         | st.integers(int((NOW - 10 * 86400) * 1000), int((NOW + 7200) * 1000))
         | st.integers(0, 2 ** 63) | st.floats(-1e300, 1e300) | scalars)


def dumps(value):
    return json.dumps(value, separators=(",", ":"))


# ---- decode ---------------------------------------------------------------------------------

@FAST
@given(st.text())
def test_decode_data_on_any_text(text):
    try:
        out = decode.decode_data(text)
    except IngestError as exc:
        assert exc.status in (200, 400)
    else:
        assert isinstance(out, list)


@FAST
@given(st.binary(max_size=200), st.booleans())
def test_decode_data_on_base64_of_any_bytes(raw, urlsafe):
    encoded = (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(raw).decode()
    try:
        out = decode.decode_data(encoded)
    except IngestError as exc:
        assert exc.status in (200, 400)
    else:
        assert isinstance(out, list)


@FAST
@given(st.text(max_size=80), st.sampled_from(["", "application/x-www-form-urlencoded",
                                               "text/plain;charset=UTF-8", "application/json",
                                               "image/png", "text/html"]) | st.text(max_size=20),
       st.binary(max_size=80))
def test_read_params_on_anything(query, ctype, body):
    try:
        params = decode.read_params(query, ctype, body)
    except IngestError as exc:
        assert exc.status in (200, 415)
    else:
        assert set(params) <= decode.CONTROL_PARAMS
        # `data` may stay in bytes when it is ASCII (an ASCII JSON body, or an ASCII form
        # body's data: decode.read_params, decode.parse_ascii_pairs).
        assert all(isinstance(v, str) or (k == "data" and v.isascii())
                   for k, v in params.items())


records_list = st.lists(st.dictionaries(st.text(max_size=8), json_values, max_size=4),
                        max_size=4)


@FAST
@given(records_list | st.dictionaries(st.text(max_size=8), json_values, max_size=4),
       st.sampled_from(["raw", "std", "urlsafe", "std_unpadded", "urlsafe_unpadded",
                        "node_spaces"]))
def test_every_sdk_encoding_round_trips(value, how):
    text = json.dumps(value, ensure_ascii=False)
    if how == "raw":
        data = text
    else:
        alphabet = base64.urlsafe_b64encode if how.startswith("urlsafe") else base64.b64encode
        data = alphabet(text.encode("utf-8")).decode()
        if how.endswith("unpadded"):
            data = data.rstrip("=")
        if how == "node_spaces":
            data = data.replace("+", " ")
    assert decode.decode_data(data) == (value if isinstance(value, list) else [value])


# ---- clean ----------------------------------------------------------------------------------

@FAST
@given(recordish, st.sampled_from(["track", "import", "engage", "groups"]),
       st.none() | st.just("198.51.100.1"), st.integers(1, 300))
def test_cleaners_return_a_token_or_reject(record, endpoint, ip, max_props):
    ctx = clean.Context(NOW, ip, max_props)
    try:
        token = clean.cleaner(endpoint)(record, ctx)
    except RecordRejected as exc:
        assert isinstance(exc.reason, str) and exc.reason
        assert isinstance(exc.message, str) and exc.message
    else:
        assert isinstance(token, str) and token


@FAST
@given(st.dictionaries(st.text(max_size=8), json_values, max_size=5), times,
       st.sampled_from(["track", "import"]))
def test_event_time_after_cleaning(props, time, endpoint):
    props["token"] = "t"
    props["distinct_id"] = "d"
    props["$insert_id"] = "i"
    if time is not None:
        props["time"] = time
    record = {"event": "e", "properties": props}
    try:
        clean.cleaner(endpoint)(record, clean.Context(NOW))
    except RecordRejected as exc:
        assert exc.field in ("properties.time", "properties") or exc.reason.startswith(
            "missing") or exc.reason == "too_many_properties"
        return
    t = record["properties"]["time"]
    assert isinstance(t, (int, float)) and not isinstance(t, bool)
    assert t <= NOW + 3600                       # clamped (track) or refused (import)
    if endpoint == "track":
        assert t >= NOW - 5 * 86400
    else:
        assert t >= 31_536_000
    assert record["properties"]["mp_processing_time_ms"] == NOW_MS


# ---- the whole app --------------------------------------------------------------------------

METHODS = st.sampled_from(["GET", "POST", "OPTIONS", "PUT", "HEAD", "DELETE"])
PATHS = st.sampled_from(["/track", "/track/", "/engage", "/groups/", "/import", "/x/track",
                         "/", "/decide", "/health"]) | st.text(
                             string.ascii_letters + "/%._-", max_size=20).map(lambda p: "/" + p)
HEADER_TEXT = st.text(string.ascii_letters + string.digits + " ,.:;/=+-_()*%!?", max_size=40)
PARAM_NAMES = st.sampled_from(sorted(decode.CONTROL_PARAMS) + ["_", "foo", ""])
PARAM_VALUES = (st.text(max_size=30) | st.sampled_from(["0", "1", "true", "fn", "a.b",
                                                        "http://x.example/"])
                | json_values.map(dumps)
                | json_values.map(lambda v: base64.b64encode(dumps(v).encode()).decode()))


def encode_pairs(pairs, escape):
    return "&".join("%s=%s" % (k, quote(v, safe="") if escape else v) for k, v in pairs)


queries = st.lists(st.tuples(PARAM_NAMES, PARAM_VALUES), max_size=5)


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(METHODS, PATHS, queries, st.booleans(), queries | st.binary(max_size=120),
       st.sampled_from([None, "application/x-www-form-urlencoded", "text/plain;charset=UTF-8",
                        "application/json", "application/octet-stream"]) | HEADER_TEXT,
       st.sampled_from([None, "gzip", "identity", "br"]),
       st.fixed_dictionaries({}, optional={"Origin": HEADER_TEXT, "X-Forwarded-For": HEADER_TEXT,
                                           "Authorization": HEADER_TEXT,
                                           "Access-Control-Request-Headers": HEADER_TEXT}),
       st.sampled_from(["127.0.0.1", "203.0.113.9", "::1", ""]))
def test_app_always_answers_well(method, path, query, escape, body, ctype, encoding, headers,
                                 remote):
    app, _ = make({"secrets": {"t": "s"}, "blocked_tokens": ["b"]})
    if isinstance(body, list):
        body = encode_pairs(body, escape).encode("utf-8")
    if encoding:
        headers = dict(headers, **{"Content-Encoding": encoding})
        if encoding == "gzip" and len(body) % 2:
            body = gz(body)             # half of them really compressed, half broken
    r = call(app, method, path, encode_pairs(query, True), body if method != "GET" else None,
             ctype, headers, remote=remote)
    # harness.check: allowed status, Content-Length == len(body), no-cache, CORS echo.
    if r.status == 200 and r.headers["content-type"].startswith("text/plain"):
        assert r.body in (b"0", b"1")


token_text = st.text(min_size=1, max_size=12).filter(lambda s: "\x00" not in s)
safe_props = st.dictionaries(st.text(max_size=10).filter(
    lambda k: k not in ("token", "time", "ip", "mp_processing_time_ms")),
    scalars | st.lists(scalars, max_size=3), max_size=4)


@settings(FAST, max_examples=60)
@given(st.lists(st.tuples(st.text(min_size=1, max_size=12), token_text, safe_props),
                min_size=1, max_size=3),
       st.sampled_from(["raw", "b64"]), st.sampled_from(["GET", "POST", "BEACON"]))
def test_valid_events_always_become_items(events, encoding, transport):
    app, sink = make()
    records = [{"event": name, "properties": dict(props, token=token)}
               for name, token, props in events]
    text = json.dumps(records, ensure_ascii=False)
    data = text if encoding == "raw" else base64.b64encode(text.encode()).decode()
    field = "data=" + quote(data, safe="")
    if transport == "GET":
        r = call(app, "GET", "/track", field + "&verbose=1")
    else:
        ctype = ("application/x-www-form-urlencoded" if transport == "POST"
                 else "text/plain;charset=UTF-8")
        r = call(app, "POST", "/track/", "", (field + "&verbose=1").encode(), ctype)
    assert (r.status, json.loads(r.body)) == (200, {"status": 1, "error": None})
    got = [json.loads(payload) for queue, payload in sink.items]
    assert [q for q, _ in sink.items] == ["events"] * len(records)
    for want, item in zip(records, got):
        props = dict(want["properties"], time=round(NOW, 3), mp_processing_time_ms=NOW_MS)
        assert item == dict(want, properties=props)


@settings(FAST, max_examples=60)
@given(st.lists(recordish, min_size=1, max_size=4), st.sampled_from(["/track", "/engage",
                                                                       "/groups"]),
       st.booleans())
def test_queue_items_are_always_strict_compact_json(records, path, ip):
    app, sink = make()
    query = "data=" + quote(json.dumps(records), safe="") + ("&ip=1" if ip else "")
    r = call(app, "GET", path, query)
    assert r.body == (b"1" if sink.items else b"0")

    def refuse(name):
        raise ValueError(name)

    for _, payload in sink.items:
        value = json.loads(payload.decode("utf-8"), parse_constant=refuse)
        assert payload == json.dumps(value, separators=(",", ":"),
                                     ensure_ascii=False).encode("utf-8")
