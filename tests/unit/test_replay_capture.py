"""bench/'s capture handling, without sockets: each request shape re-encoded the way it
was sent after its record times moved, verbose answers asked for where the worker reads
them, recorded pace, and what an answer says about the records of its request."""
import base64
import gzip
import json
import urllib.parse

import pytest

from bench import capture, outcome, payload
from ingest import decode

NOW = 1_790_000_000.0
OLD = NOW - 10 * 86400


def entry(uri, body=None, content_type=b"", method="GET", encoding="", time=None):
    return capture.Entry(method, uri, content_type, body, "203.0.113.1", 200, time, encoding,
                         "")


def records_of(e):
    """What the worker would decode from the entry (ingest/decode.py itself)."""
    body = e.body or b""
    if e.encoding == "gzip" or body[:2] == b"\x1f\x8b":
        body = gzip.decompress(body)
    params = decode.read_params(e.uri.partition(b"?")[2].decode("latin-1"),
                                e.content_type.decode(), body)
    return decode.decode_data(params["data"])


def b64(obj, urlsafe=False, pad=True):
    text = base64.b64encode(json.dumps(obj, separators=(",", ":")).encode()).decode()
    text = text.translate(str.maketrans("+/", "-_")) if urlsafe else text
    return text if pad else text.rstrip("=")


EVENT = {"event": "e", "properties": {"token": "t", "time": OLD, "k": "é"}}
MS_EVENT = {"event": "e", "properties": {"token": "t", "time": int(OLD * 1000) - 5000}}
FORM = b"application/x-www-form-urlencoded"
SHAPES = {
    # the browser SDK: base64, encodeURIComponent, in a form body, verbose in the query
    "browser_post": entry(b"/track/?verbose=1&ip=1", method="POST", content_type=FORM,
                          body=b"data=" + urllib.parse.quote(b64([EVENT, MS_EVENT]),
                                                             safe="").encode()),
    # the Node SDK: a GET with urlencoded base64, and a POST with raw base64 ('+' as is)
    "node_get": entry(b"/track?ip=0&verbose=0&data=" + urllib.parse.quote_plus(
        b64(MS_EVENT)).encode()),
    "node_post": entry(b"/track?ip=0&verbose=0", method="POST", content_type=FORM,
                       body=b"data=" + b64([EVENT] * 3).encode()),
    # the Python SDK: raw JSON, urlencoded, verbose in the body
    "python_post": entry(b"/track", method="POST", content_type=FORM,
                         body=urllib.parse.urlencode({"data": json.dumps([EVENT]), "verbose": 1,
                                                      "ip": 0}).encode()),
    # phone SDKs: gzip bodies; URL-safe unpadded base64 in a query
    "gzip_form": entry(b"/track?ip=1", method="POST", content_type=FORM,
                       body=gzip.compress(b"data=" + urllib.parse.quote(
                           json.dumps([EVENT])).encode())),
    "urlsafe_query": entry(b"/track?data=" + b64(EVENT, urlsafe=True, pad=False).encode()),
    # /import: a JSON body and an NDJSON body; /engage with $time
    "import_json": entry(b"/import?strict=1", method="POST", content_type=b"application/json",
                         body=json.dumps([EVENT, MS_EVENT]).encode()),
    "import_ndjson": entry(b"/import", method="POST", content_type=b"application/x-ndjson",
                           body=b"".join(json.dumps(r).encode() + b"\n" for r in (EVENT, EVENT))),
    "engage": entry(b"/engage?data=" + urllib.parse.quote(b64(
        {"$token": "t", "$distinct_id": "d", "$time": OLD, "$set": {"a": 1}})).encode()),
}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_unchanged_records_rebuild_the_same_bytes(name):
    e = SHAPES[name]
    p = payload.Payload(e)
    assert p.records == records_of(e)
    assert p.rebuild(p.records) == e


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_shifted_times_keep_the_encoding_and_the_gaps(name):
    e = SHAPES[name]
    [shifted], delta = payload.shift_entries([e], NOW)
    before, after = records_of(e), records_of(shifted)
    assert delta == pytest.approx(NOW - max(payload._seconds(t) for t in _times(before)),
                                  abs=0.001)
    for old, new in zip(_times(before), _times(after)):
        assert type(old) is type(new)
        unit = 1000 if old > 1e11 else 1
        assert new - old == pytest.approx(delta * unit, abs=unit * 0.001 + 0.5 * (unit == 1
                                                                             and isinstance(old, int)))
    assert max(payload._seconds(t) for t in _times(after)) == pytest.approx(NOW, abs=1)
    # Everything but the data value is byte for byte what was logged.
    assert shifted.uri.partition(b"?")[0] == e.uri.partition(b"?")[0]
    p, q = payload.Payload(e), payload.Payload(shifted)
    assert (q.where, q.gzip, q.b64, q._styles()) == (p.where, p.gzip, p.b64, p._styles())
    if p.where in ("form", "query"):
        start, end = p.span
        assert q.text[:start] == p.text[:start] and q.text[q.span[1]:] == p.text[end:]


def _times(records):
    out = []
    for r in records:
        props = r.get("properties") or {}
        out += [props["time"]] if "time" in props else []
        out += [r["$time"]] if "$time" in r else []
    return out


def test_verbose_is_asked_where_the_worker_reads_it():
    params = lambda e: decode.read_params(  # noqa: E731
        e.uri.partition(b"?")[2].decode("latin-1"), e.content_type.decode(),
        gzip.decompress(e.body) if (e.body or b"")[:2] == b"\x1f\x8b" else e.body or b"")
    for name, e in SHAPES.items():
        v = payload.with_verbose(e)
        assert params(v).get("verbose") == "1", name
        assert records_of(v) == records_of(e), name
    body_zero = entry(b"/track?verbose=1", method="POST", content_type=FORM,
                      body=b"verbose=0&data=%7B%7D")
    assert params(payload.with_verbose(body_zero))["verbose"] == "1"


def test_strict_import_is_recognised():
    assert payload.is_strict(SHAPES["import_json"])
    assert not payload.is_strict(SHAPES["import_ndjson"])
    assert not payload.is_strict(entry(b"/track?strict=1"))


def test_schedule_spreads_whole_seconds_and_scales_with_speed():
    entries = [entry(b"/track", time=100.0)] * 4 + [entry(b"/track", time=101.0)] * 2 + [
        entry(b"/track", time=None), entry(b"/track", time=99.0)]
    # The entry without a time and the one stamped earlier go with the second before.
    assert capture.schedule(entries, 1.0) == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
    assert capture.schedule(entries, 2.0)[4] == 0.5
    assert capture.schedule(entries, 0) is None
    fine = [entry(b"/t", time=t) for t in (10.5, 10.75, 12.0)]
    assert capture.schedule(fine, 1.0) == [0.0, 0.25, 1.5]


REJECTED_TIME = "record 0: properties.time is more than 5 days old (use /import)"


@pytest.mark.parametrize("status, body, n, strict, expected", [
    (200, b"1", 1, False, {"accepted": 1}),
    (200, b"1", 5, False, {"accepted": 1, "uncertain": 4}),
    (200, b'{"status": 1, "error": null}', 5, False, {"accepted": 5}),
    (200, b'{"status": 0, "error": "%s"}' % REJECTED_TIME.encode(), 4, False,
     {"rejected:time_too_old": 4}),
    (200, b'{"status": 1, "error": "record 2: properties.token is missing"}', 4, False,
     {"accepted": 1, "rejected:missing_token": 1, "uncertain": 2}),
    (200, b'{"status": 0, "error": "data is not valid JSON"}', 0, False,
     {"refused:invalid_json": 1}),
    (200, b"0", 3, False, {"refused:" + outcome.PLAIN_ZERO: 1, "rejected:" + outcome.PLAIN_ZERO: 3}),
    (200, b'cb({"status": 1, "error": null})', 2, False, {"accepted": 2}),
    (200, b"cb(1)", 1, False, {"accepted": 1}),
    (400, b'{"code": 400, "error": "x", "status": "Bad Request", "num_records_imported": 2, '
          b'"failed_records": [{"index": 1, "$insert_id": null, "field": "properties.time", '
          b'"message": "properties.time is before 1971"}]}', 3, True,
     {"accepted": 2, "rejected:time_too_old": 1}),
    (401, b'{"code": 401, "error": "Invalid credentials", "status": "Unauthorized"}', 2, True,
     {"refused:invalid_credentials": 1, "rejected:invalid_credentials": 2}),
    (413, b'{"status": 0, "error": "request body exceeds 10 bytes"}', 0, False,
     {"refused:body_too_large": 1}),
    (503, b'{"status": 0, "error": "server busy; retry"}', 6, False, {"failed": 6}),
    (200, b"GIF89a...", 2, False, {"uncertain": 2}),
])
def test_what_an_answer_says_about_its_records(status, body, n, strict, expected):
    counts = {}
    outcome.tally(counts, status, body, n, strict)
    assert counts == expected


def test_summary_and_threshold():
    counts = {"accepted": 97, "rejected:time_too_old": 2, "uncertain": 1, "failed": 4}
    s = outcome.summarize(counts, 0.01)
    assert (s["sent"], s["rejected"], s["rejected_share"], s["over_threshold"]) == (
        104, 2, 0.02, True)
    assert not outcome.summarize(counts, 0.05)["over_threshold"]


def test_every_record_message_maps_back_to_its_reason():
    from ingest.errors import REASONS, RECORD
    for name, entry_ in REASONS.items():
        if RECORD in entry_.scopes:
            text = entry_.text("message", {"field": _FIELDS.get(name, "properties.x"),
                                           "limit": 3, "ops": "$set", "present": "none",
                                           "kind": "an object"})
            assert outcome.reason_of("record 4: " + text) == name, name


_FIELDS = {"invalid_event": "event", "missing_token": "properties.token",
           "missing_distinct_id": "properties.distinct_id",
           "missing_insert_id": "properties.$insert_id", "missing_group_key": "$group_key",
           "missing_group_id": "$group_id", "missing_time": "properties.time",
           "invalid_properties": "properties"}


@pytest.mark.parametrize("flags", [
    ["--order", "recorded", "--rate", "100"],       # a recorded replay keeps its own pace
    ["--order", "recorded", "--speed", "-1"],
    ["--order", "sorted"],
    ["--max-rejected", "150"],
    ["--skip-status", "40x"],
    ["--duration", "0"],
])
def test_operator_typos_end_with_a_usage_error(flags, capsys):
    from bench import replay
    with pytest.raises(SystemExit) as exc:
        replay.parse_args(["--log", "x.log", "--url", "http://127.0.0.1:1"] + flags)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_defaults_per_order():
    from bench import replay
    base = ["--log", "x.log", "--url", "http://127.0.0.1:1"]
    assert replay.parse_args(base).duration == 10.0
    args = replay.parse_args(base + ["--order", "recorded", "--skip-status", "none"])
    assert (args.duration, args.speed, args.skip_status) == (None, 1.0, ())


def test_truncated_and_foreign_lines_are_skipped(tmp_path):
    good = (b'{"time":"2026-11-26T03:00:00+00:00","remote_addr":"1.2.3.4","method":"GET",'
            b'"uri":"/track?data=e30","status":200}\n')
    path = tmp_path / "cut.log"
    path.write_bytes(good + good[:40] + b"\n\xff\xfe garbage\n" + b"[1, 2]\n" + good)
    entries, skipped = capture.load_log(str(path))
    assert (len(entries), skipped) == (2, 3)
