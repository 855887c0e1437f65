"""The fast paths are only fast: decode.loads and encode.encode_record (msgspec) give
exactly what the reference paths (simplejson in, the standard library's C encoder out)
give, on generated values and on the texts where the libraries are known to differ;
decode.b64decode gives what it gave before it skipped its needless copies."""
import base64
import json
import math
from urllib.parse import quote, quote_plus

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ingest import decode, encode
from ingest.errors import IngestError, RecordRejected


def shape(value):
    """A value with every type made visible (1 and 1.0 and True differ; -0.0 and 0.0
    differ; NaN equals NaN)."""
    if isinstance(value, dict):
        return ("d", [(k, shape(v)) for k, v in value.items()])
    if isinstance(value, list):
        return ("l", [shape(v) for v in value])
    if isinstance(value, float):
        return ("f", "nan" if math.isnan(value) else value.hex())
    return (type(value).__name__, value)


def outcome(fn, *args):
    try:
        return "ok", fn(*args)
    except (IngestError, RecordRejected) as exc:
        return "error", exc.reason


def same_outcome(fast, exact, text):
    a, b = outcome(fast, text), outcome(exact, text)
    return (a[0], shape(a[1]) if a[0] == "ok" else a[1]) == \
        (b[0], shape(b[1]) if b[0] == "ok" else b[1])


floats = st.one_of(st.floats(allow_nan=False, allow_infinity=False),
                   st.floats(min_value=-1e-3, max_value=1e-3),
                   st.builds(lambda m, e: float("%de%d" % (m, e)), st.integers(-999, 999),
                             st.integers(-330, 310)).filter(math.isfinite))
scalars = st.one_of(st.none(), st.booleans(), st.integers(), floats,
                    st.integers(min_value=-10 ** 40, max_value=10 ** 40),
                    st.text(), st.text(alphabet=st.characters(codec="utf-8")))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=8), inner, max_size=5)),
    max_leaves=30)


@settings(max_examples=200, deadline=None)
@given(values)
def test_decoding_generated_json_matches_simplejson(value):
    for text in (json.dumps(value), json.dumps(value, ensure_ascii=False),
                 json.dumps(value, separators=(",", ":"), ensure_ascii=False)):
        assert same_outcome(decode.loads, decode.strict_loads, text)


def fast_encode(value):
    """What the worker does with a record: decode its text, then encode it on the path
    the decode allows."""
    text = json.dumps({"event": "e", "properties": {"v": value, "time": 1795662710.123}},
                      ensure_ascii=False)
    record, plain = decode.loads_checked(text)
    return outcome(encode.encode_record, record, 1 << 30, plain), \
        outcome(encode._exact, record)


@settings(max_examples=200, deadline=None)
@given(values)
def test_encoding_generated_records_matches_the_c_encoder(value):
    fast, exact = fast_encode(value)
    assert fast == exact


HOSTILE_TEXTS = [
    '{"a":%s}' % ("1" * 5000), '{"a":%s}' % ("9" * 4300), '{"a":1e400}', '{"a":-1e400}',
    '{"a":1e-400}', '{"a":"\\ud800"}', '{"a":"\\udc00x"}', '{"a":"\\ud83d\\ude00"}',
    '{"a":NaN}', '{"a":Infinity}', '{"a":-Infinity}', '\ufeff{"a":1}', '{"a":1}x',
    '{"a":"x\ty"}', '{"a":1.}', '{"a":01}', '{"a":.5}', '{"a":[1,]}', '{"a":1,"a":2}',
    '{"\\u0000":1}', '{"a":4.9e-324}', '{"a":1.7976931348623157e308}', '{"a":-0}',
    '{"a":-0.0}', '{"a":1E5}', '{"a":1.0E-7}', '[' * 3000 + ']' * 3000, ' [1] ', '',
]


@pytest.mark.parametrize("text", HOSTILE_TEXTS, ids=range(len(HOSTILE_TEXTS)))
def test_decoding_hostile_texts_matches_simplejson(text):
    assert same_outcome(decode.loads, decode.strict_loads, text)


HOSTILE_VALUES = [1e-7, 1e22, 1e16, 1e15, 123456789012345.67, 5e-324, -0.0, float("inf"),
                  float("-inf"), 2 ** 70, -(2 ** 64), "\ud800", "a\u2028b",
                  "\x00\x1f\x7f", "null", "nullable", "x:1e5", ":1e5", None, True,
                  [1e-5, None], {"k": 1e300}]


@pytest.mark.parametrize("value", HOSTILE_VALUES, ids=range(len(HOSTILE_VALUES)))
def test_encoding_hostile_values_matches_the_c_encoder(value):
    if isinstance(value, float) and not math.isfinite(value):
        text = '{"v": %s}' % ("1e400" if value > 0 else "-1e400" if value < 0 else "0")
        record, plain = decode.loads_checked(text)
        assert not plain
        assert outcome(encode.encode_record, record, 1 << 30, plain) == \
            outcome(encode._exact, record)
        return
    fast, exact = fast_encode(value)
    assert fast == exact


def test_plain_records_take_the_fast_path_and_others_the_exact_one():
    assert decode.loads_checked('{"a":1.5,"b":[2,"x"]}')[1] is True
    for text in ('{"a":1e-7}', '{"a":0.00001}', '{"a":1e16}', '{"a":"\\ud800"}', '{"a":1e400}'):
        assert decode.loads_checked(text)[1] is False, text


@pytest.mark.parametrize("plain", [True, False])
def test_the_size_limit_applies_on_both_paths(plain):
    with pytest.raises(RecordRejected) as info:
        encode.encode_record({"event": "e", "properties": {"s": "x" * 100}}, 50, plain)
    assert info.value.reason == "record_too_large"


def reference_b64decode(value):
    """decode.b64decode as it was before its copies were skipped."""
    import base64
    import binascii
    raw = value.strip().encode("ascii", "replace").translate(bytes.maketrans(b"-_ ", b"+/+"))
    raw = raw.rstrip(b"=")
    raw += b"=" * (-len(raw) % 4)
    try:
        return "ok", base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        return "error", "invalid_base64"


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="AQgw+/-_= \t\n%é", max_size=14))
def test_b64decode_is_the_reference(value):
    assert outcome(decode.b64decode, value) == reference_b64decode(value)


def _edited(encoded, edits):
    """`encoded` with each (position, byte) of `edits` written over it (modulo its length)."""
    raw = bytearray(encoded)
    for pos, byte in edits:
        if raw:
            raw[pos % len(raw)] = byte
    return bytes(raw)


# Long valid encodings with a few bytes overwritten: pybase64's SIMD loop only runs on
# inputs of several dozen bytes, and those are what batches send.
_LONG_EDITED = st.builds(
    _edited, st.binary(min_size=30, max_size=400).map(base64.b64encode),
    st.lists(st.tuples(st.integers(0, 10 ** 6), st.sampled_from(b"=\n ?\x80-_A+/\x00")),
             max_size=3))


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=24) | st.lists(st.sampled_from(
    [b"QQ", b"QUI", b"QUJD", b"=", b"==", b"+", b"/", b"?", b" ", b"\n", b"A", b"w"]),
    max_size=10).map(b"".join) | _LONG_EDITED)
def test_pybase64_never_accepts_what_binascii_strict_refuses(raw):
    """decode.b64decode tries pybase64 first: whatever it accepts, binascii's strict mode
    (the reference, which decides every refusal) accepts too, with the same bytes."""
    import binascii
    import pybase64
    try:
        fast = pybase64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        return
    assert binascii.a2b_base64(raw, strict_mode=True) == fast


@settings(max_examples=600, deadline=None)
@given(st.lists(st.sampled_from(["a", "+", " ", "%2B", "%2b", "%7B", "%22", "%3A", "%20", "%",
                                 "%2", "%zz", "%4G", "%C3%A9", "%C3", "%FF", "%00", "\\", "\\x41",
                                 "\\n", "é", "=", "&", "x"]), max_size=30))
def test_unquote_form_is_unquote_plus(parts):
    """Both ways of unescaping: between the escapes find() finds (few of them), and
    escape_decode over the whole value (more than decode._FEW_ESCAPES)."""
    from urllib.parse import unquote_plus
    text = "".join(parts)
    assert decode.unquote_form(text) == unquote_plus(text)
    many = text * 12 + "%41" * decode._FEW_ESCAPES
    assert decode.unquote_form(many) == unquote_plus(many)


@settings(max_examples=800, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=4), st.sampled_from([
    b"\xed\xa0\x80", b"\xc0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82\xac", b"\xe2\x82",
    b"\xef\xbb\xbf", b"\\ud800", b"\\u00e9", b'"', b"\\", b"\x00",
    b"\xf0\x9f\x98\x80"])), max_size=8),
    st.sampled_from([b'[{"event":"%s","properties":{"x":1.5}}]', b'{"%s":[1e400]}',
                     b'{"k":"v"} %s', b'[1, %s2]']))
def test_base64_data_decodes_as_its_utf8_text(parts, template):
    """msgspec reads base64's bytes without a str between: a text whose bytes are not
    UTF-8 is refused as invalid_utf8 and any other decodes as the same text sent raw."""
    raw = template.replace(b"%s", b"".join(parts))
    try:
        expected = outcome(decode.decode_records, raw.decode("utf-8"))
    except UnicodeDecodeError:
        expected = ("error", "invalid_utf8")
    got = outcome(decode.decode_records, base64.b64encode(raw).decode())
    assert got[0] == expected[0]
    if got[0] == "ok":
        assert [shape(r) for r in got[1][0]] == [shape(r) for r in expected[1][0]]
        assert got[1][1:] == expected[1][1:]
    else:
        assert got[1] == expected[1]


@settings(max_examples=1500, deadline=None)
@example("1.2.3.01")
@example("1.2.3.\u0663")
@example("1.2.3.256")
@example("1.2.3.4.5")
@example("01.2.3.4")
@example("1.2.3.4\n")
@given(st.one_of(
    st.lists(st.sampled_from(["0", "1", "9", "00", "01", "10", "99", "100", "199", "249", "255",
                              "256", "300", "999", "1000", "0x1", "٣", "1 ", " 1", "-1", ""]),
             min_size=1, max_size=6).map(".".join),
    st.ip_addresses().map(str),
    st.text(alphabet="0123456789.:abcdef%", max_size=20)))
def test_the_forwarded_address_reads_as_ipaddress_writes_it(address):
    """ClientIP returns a canonical dotted quad as it is: exactly what
    str(ipaddress.ip_address()) gives, and the peer for anything it refuses."""
    import ipaddress

    from ingest import config
    from ingest.http.request import ClientIP
    try:
        expected = str(ipaddress.ip_address(address.strip()))
    except ValueError:
        expected = "127.0.0.1"
    client_ip = ClientIP(config.networks("127.0.0.0/8"))
    environ = {"REMOTE_ADDR": "127.0.0.1", "HTTP_X_FORWARDED_FOR": address + ", 10.0.0.1"}
    assert client_ip(environ) == expected


@pytest.mark.parametrize("shape", ["single", "batch50", "mixed"])
def test_the_instruction_benchmark_runs_requests_the_app_accepts(shape, monkeypatch):
    """bench.instructions counts what its pipeline executes under valgrind (by hand, not
    in CI): each request must be one the app accepts whole, or it would count a refusal."""
    from bench import instructions
    from ingest.sinks.memory import MemorySink
    stored, answers = [], []
    monkeypatch.setattr(MemorySink, "put", lambda self, pairs: stored.extend(pairs))
    instructions.pipeline(shape, worker_gc=False, answers=answers)()
    bodies = [b"".join(body) for _status, body in answers]
    if shape == "mixed":    # the log's ~1% malformed requests are refused; the rest stored
        assert len(answers) == instructions.MIXED_REQUESTS
        accepted = (b"1", b'{"status": 1, "error": null}')     # plain, verbose
        refused = [(status, body) for (status, _), body in zip(answers, bodies)
                   if status != "200 OK" or body not in accepted]
        assert 0 < len(refused) <= 0.03 * len(answers), refused
        assert len(stored) > 5 * instructions.MIXED_REQUESTS
        return
    assert [(status, body) for (status, _), body in zip(answers, bodies)] == [("200 OK", b"1")]
    assert len(stored) == {"single": 1, "batch50": 50}[shape]


def test_the_stage_benchmark_runs_both_paths_of_each_stage():
    """bench.micro's stages time each fast path beside its reference path; a change of
    the stages' signatures must not leave it broken (it is run by hand, not by CI)."""
    from bench import micro
    figures = micro.bench_stages(micro.load_entries(None, 40, 1), 0.05)
    for key in ("encode_us_per_record", "encode_exact_us_per_record",
                "json_decode_us_per_record", "json_decode_exact_us_per_record"):
        assert figures[key] > 0, key
    assert figures["records_on_fast_json_path"] > 0.5
    # Its JSON texts come from data values as read_params gives them: str or bytes.
    for data in ('[{"a":1}]', b'[{"a":1}]', b" {}", base64.b64encode(b'[{"a":1}]'),
                 base64.b64encode(b'[{"a":1}]').decode()):
        assert micro.json_text(data) is not None, data


def test_deep_texts_are_decided_by_simplejson_alone():
    """Near the recursion limit msgspec reads a few levels deeper than simplejson: a text
    that may be nested that deep is decoded by simplejson alone (plain is False), so a
    request simplejson refuses whole as too_deep stays refused.  Where the limit falls
    depends on the caller's stack, so outcomes are compared only away from it."""
    def deep_text(depth):
        return '[{"event":"ok","properties":{"token":"t"}},{"event":"e","properties":' \
               '{"token":"t","x":%s}}]' % ("[" * depth + "]" * depth)

    for depth in list(range(390, 1001, 5)):
        try:
            records, plain, _ = decode.decode_records(deep_text(depth))
        except IngestError as exc:
            assert exc.reason == "too_deep", depth
        else:
            assert plain is (depth + 1 < 400), depth    # nesting_bound: depth + 5 - 2 * 2
            assert list_depth(records) == depth
    for depth in (395, 600):    # the same through base64 (msgspec reads its bytes)
        sent = base64.b64encode(deep_text(depth).encode()).decode()
        fast = outcome(lambda t: decode.decode_records(t)[:2], sent)
        assert fast[0] == "ok" and fast[1][1] is (depth + 1 < 400), depth
        assert list_depth(fast[1][0]) == depth
    for depth in (395, 600, 5000):
        fast = outcome(lambda t: decode.decode_records(t)[0], deep_text(depth))
        exact = outcome(decode.strict_loads, deep_text(depth))
        # Compared without recursion: shape() or == would hit the limit themselves.
        assert (fast[0], fast[1] if fast[0] == "error" else list_depth(fast[1])) == \
            (exact[0], exact[1] if exact[0] == "error" else list_depth(exact[1])), depth


def list_depth(records):
    """How deep the last record's `x` is nested, counted in a loop."""
    value, depth = records[-1]["properties"]["x"], 0
    while isinstance(value, list):
        value, depth = value[0] if value else None, depth + 1
    return depth


def test_ndjson_lines_end_at_control_characters_only():
    """Records end at LF, CR, CRLF, VT, FF or FS/GS/RS (as str.splitlines() ends them),
    never at U+0085, U+2028 or U+2029, which a JSON string may hold raw."""
    body = ('{"event":"a\u2028b\u0085c\u2029","properties":{}}\r\n\n'
            '{"event":"d","properties":{}}\r{"event":"e","properties":{}}\x0c'
            '{"event":"f","properties":{}}\x0b{"event":"g","properties":{}}\x1c'
            '{"event":"h","properties":{}}\x1d{"event":"i","properties":{}}\x1e'
            '{"event":"j","properties":{}}\n')
    params = decode.read_params("", "application/x-ndjson", body.encode("utf-8"))
    assert [r["event"] for r in decode.decode_data(params["data"])] == [
        "a\u2028b\u0085c\u2029", "d", "e", "f", "g", "h", "i", "j"]


def reference_parse_pairs(text):
    """decode.parse_pairs as it was before it found pairs with find()."""
    into = {}
    for part in text.split("&"):
        name, _, value = part.partition("=")
        if name in decode.CONTROL_PARAMS:
            into[name] = decode.unquote_form(value) if ("%" in value or "+" in value) else value
    return into


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.sampled_from(["data", "ip", "verbose", "_", "=", "&", "1", "%7B", "+", "x"]),
                max_size=14).map("".join))
def test_parse_pairs_is_the_split_reference(text):
    assert decode.parse_pairs(text, {}) == reference_parse_pairs(text)


_EVENT_JSON = json.dumps([{"event": "e ~>?", "properties": {"token": "t", "x": [1.5, "é"]}}],
                         ensure_ascii=False)
_FORM_DATA = st.one_of(
    st.sampled_from([_EVENT_JSON.replace("é", "e"), base64.b64encode(_EVENT_JSON.encode()).decode(),
                     base64.urlsafe_b64encode(_EVENT_JSON.encode()).decode().rstrip("="),
                     quote_plus(_EVENT_JSON), quote(_EVENT_JSON, safe=""),
                     quote(base64.b64encode(_EVENT_JSON.encode()).decode(), safe="")]),
    st.lists(st.sampled_from(["%", "%2B", "%2b", "%7B", "%22", "%C3%A9", "%ff", "%ZZ", "%5C",
                              "%00", "+", " ", "\t", "\x1f", "\x0b", "{", "[", "]", "}", '"',
                              ":", ",", "1", "eyJ", "W3s", "=", "-", "_", "\\", "a"]),
             max_size=12).map("".join))


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.one_of(_FORM_DATA.map(lambda d: "data=" + d),
                          st.sampled_from(["verbose=1", "ip=%31", "_=1", "callback=a+b", "&",
                                           "=", "data", "\x1cdata="])), max_size=4),
       st.sampled_from(["", "application/x-www-form-urlencoded", "text/plain"]))
def test_an_ascii_form_body_reads_as_its_text(pairs, ctype):
    """A form body that is ASCII is parsed in bytes, its `data` kept in bytes where it
    reads the same: the parameters and what decode_records makes of them are those of
    the body decoded to str first, as before (outcomes, records, plain, brackets)."""
    body = "&".join(pairs)
    got = decode.read_params("", ctype, body.encode("ascii"))
    expected = decode.parse_pairs(body, {})
    assert {k: v.decode("ascii") if isinstance(v, bytes) else v for k, v in got.items()} \
        == expected
    if "data" in expected:
        fast = outcome(decode.decode_records, got["data"])
        exact = outcome(decode.decode_records, expected["data"])
        assert fast[0] == exact[0]
        if fast[0] == "ok":
            assert shape(fast[1][0]) == shape(exact[1][0]) and fast[1][1:] == exact[1][1:]
        else:
            assert fast[1] == exact[1]


@pytest.mark.parametrize("data", [_EVENT_JSON.replace("é", "e"),
                                  "\n\x1c\t" + _EVENT_JSON[:-1].replace("é", "e"),
                                  " \x1f\n" + _EVENT_JSON.replace("é", "\\u00e9") + "\t\x1c",
                                  "[1e400]", "[NaN]", "[" * 500 + "]" * 500, "x"])
def test_an_ascii_json_body_reads_as_its_text(data):
    got = decode.read_params("", "application/json", data.encode("ascii"))["data"]
    assert isinstance(got, bytes)
    fast, exact = outcome(decode.decode_records, got), outcome(decode.decode_records, data)
    # repr, not shape(): the deep text would take shape() past the recursion limit.
    assert (fast[0], fast[1] if fast[0] == "error" else repr(fast[1])) == \
        (exact[0], exact[1] if exact[0] == "error" else repr(exact[1]))
