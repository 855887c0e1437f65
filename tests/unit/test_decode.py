"""decode.py: request parameters and the `data` value -> raw records, or IngestError.

Covers mixpanel-api.md section 1 (where `data` and the control parameters travel, the
encodings the SDKs use, Node's unescaped base64) and issue 8's malformed inputs.
"""
import json

import pytest

from ingest import decode
from ingest.errors import IngestError
from testkit.payloads import b64, b64_json

EVENT = {"event": "Signed Up", "properties": {"token": "tok", "plan": "pro + more"}}
# This text's base64 holds both '+' and '/' (the Node test payload of mixpanel-api.md 1.3).
TRICKY = {"event": "~~~>>>???", "properties": {"token": "tok", "x": "~~~>>>???"}}


def texts(params):
    """`params` with a `data` kept in bytes (an ASCII body's) read as the text it is."""
    return {k: v.decode("ascii") if isinstance(v, bytes) else v for k, v in params.items()}


def reason(value):
    with pytest.raises(IngestError) as info:
        decode.decode_data(value)
    return info.value.status, info.value.reason


# ---- parameters ----------------------------------------------------------------------------

def test_parse_pairs_keeps_only_control_parameters_and_unquotes_them():
    got = decode.parse_pairs("data=%7B%7D&_=1700000000000&verbose=1&ip=0&foo=bar&callback=a.b",
                             {})
    assert got == {"data": "{}", "verbose": "1", "ip": "0", "callback": "a.b"}


def test_parse_pairs_plus_is_a_space_and_last_value_wins():
    assert decode.parse_pairs("redirect=a+b%2Bc&verbose=0&verbose=1", {}) == {
        "redirect": "a b+c", "verbose": "1"}


@pytest.mark.parametrize("name", ["ip", "verbose", "callback", "img", "redirect", "test",
                                  "strict", "api_key"])
def test_every_control_parameter_is_read_from_query_and_body(name):
    assert decode.read_params(name + "=q", "", b"")[name] == "q"
    assert decode.read_params("", "application/x-www-form-urlencoded",
                              (name + "=b").encode())[name] == "b"


def test_data_is_read_from_query_and_body():
    assert decode.read_params("data=q", "", b"")["data"] == "q"
    assert texts(decode.read_params("", "application/x-www-form-urlencoded",
                                    b"data=b"))["data"] == "b"


def test_body_fields_win_over_query_fields():
    got = texts(decode.read_params("verbose=0&ip=1&data=fromquery",
                                   "application/x-www-form-urlencoded", b"data=frombody&verbose=1"))
    assert got == {"verbose": "1", "ip": "1", "data": "frombody"}


@pytest.mark.parametrize("ctype", ["application/x-www-form-urlencoded",
                                   "application/x-www-form-urlencoded; charset=UTF-8",
                                   "text/plain;charset=UTF-8", "text/plain", "",
                                   "APPLICATION/X-WWW-FORM-URLENCODED"])
def test_form_and_sendbeacon_text_plain_bodies_are_parsed_as_forms(ctype):
    assert texts(decode.read_params("", ctype, b"data=abc&verbose=1")) == {"data": "abc",
                                                                           "verbose": "1"}


def test_json_body_is_the_data_value():
    body = json.dumps([EVENT]).encode()
    assert texts(decode.read_params("verbose=1", "application/json", body)) == {
        "verbose": "1", "data": body.decode()}


@pytest.mark.parametrize("ctype", ["application/octet-stream", "multipart/form-data; boundary=x",
                                   "image/png"])
def test_other_body_types_are_415(ctype):
    with pytest.raises(IngestError) as info:
        decode.read_params("", ctype, b"data=x")
    assert (info.value.status, info.value.reason) == (415, "unsupported_content_type")


def test_empty_body_with_any_type_is_just_the_query():
    assert decode.read_params("data=x", "application/octet-stream", b"") == {"data": "x"}


def test_invalid_utf8_body_is_a_clean_zero_answer():
    with pytest.raises(IngestError) as info:
        decode.read_params("", "application/x-www-form-urlencoded", b"data=\xff\xfe{")
    assert (info.value.status, info.value.reason) == (200, "invalid_utf8")


def test_node_unescaped_base64_body_survives_form_decoding():
    encoded = b64_json(TRICKY, compact=False)
    assert "+" in encoded and "/" in encoded
    params = decode.read_params("ip=0&verbose=0", "application/x-www-form-urlencoded",
                                ("data=" + encoded).encode())
    assert b" " in params["data"]           # the form decoder made '+' a space...
    assert decode.decode_data(params["data"]) == [TRICKY]   # ...and decoding repairs it


# ---- the data value ------------------------------------------------------------------------

def test_raw_json_object_is_one_record():
    assert decode.decode_data(json.dumps(EVENT)) == [EVENT]


def test_raw_json_array_is_many_records_of_any_type():
    assert decode.decode_data('[{"a":1}, 2, "x", null]') == [{"a": 1}, 2, "x", None]
    assert decode.decode_data("[]") == []


def test_raw_json_with_surrounding_whitespace():
    assert decode.decode_data('  \n {"a": 1} \n') == [{"a": 1}]


def test_raw_json_keeps_literal_spaces_and_pluses():
    got = decode.decode_data('{"event":"a b+c","properties":{"token":"t k"}}')
    assert got == [{"event": "a b+c", "properties": {"token": "t k"}}]


@pytest.mark.parametrize("urlsafe", [False, True], ids=["standard", "urlsafe"])
@pytest.mark.parametrize("pad", [True, False])
def test_base64_standard_or_urlsafe_padded_or_not(urlsafe, pad):
    for obj in (EVENT, TRICKY, [EVENT, TRICKY]):
        want = obj if isinstance(obj, list) else [obj]
        assert decode.decode_data(b64_json(obj, urlsafe, pad, compact=False)) == want


def test_base64_needing_padding_really_is_unpadded():
    # A JSON text whose length is not a multiple of 3 gives '=' padding to strip.
    text = json.dumps({"event": "e", "properties": {"token": "tok"}})
    assert len(text.encode()) % 3 != 0
    assert decode.decode_data(b64(text, pad=False)) == [
        json.loads(text)]


def test_base64_with_spaces_for_pluses_is_repaired():
    encoded = b64_json(TRICKY, compact=False)
    assert decode.decode_data(encoded.replace("+", " ")) == [TRICKY]


def test_base64_of_utf8_keeps_non_ascii():
    obj = {"event": "café ☕ 😀", "properties": {"token": "t"}}
    assert decode.decode_data(b64_json(obj, compact=False)) == [obj]


@pytest.mark.parametrize("value", [None, "", "   ", "\n"])
def test_missing_data(value):
    assert reason(value) == (200, "missing_data")


@pytest.mark.parametrize("value", ["not base64!!", "a", "abcde", "a===b", "é", "QUJD\x00"])
def test_bad_base64(value):
    assert reason(value) == (200, "invalid_base64")


def test_base64_of_invalid_utf8():
    assert reason(b64(b'{"event":"\xff"}')) == (200, "invalid_utf8")


@pytest.mark.parametrize("value", ['{"event":', "{'a':1}", '{"a":1,}', "[1,2", '{"a":1} x',
                                   '{"a":01}', '{"a":"\x01"}'])
def test_bad_raw_json(value):
    assert reason(value) == (200, "invalid_json")


def test_base64_of_bad_json():
    assert reason(b64(b"hello world")) == (200, "invalid_json")


@pytest.mark.parametrize("value", ["1", "true", '"str"', "null", "3.5"])
def test_json_scalars_are_not_records(value):
    assert reason(b64(value)) == (200, "invalid_data")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_refused(constant):
    assert reason('{"x": %s}' % constant) == (200, "invalid_json")
    assert reason(b64("[%s]" % constant)) == (200, "invalid_json")


def test_enormous_integer_is_refused_cleanly():
    assert reason('{"x": 1%s}' % ("0" * 5000)) == (200, "invalid_json")


def test_deep_nesting_is_a_400():
    assert reason("[" * 100_000) == (400, "too_deep")
    assert reason('{"a":' * 100_000) == (400, "too_deep")


def test_moderate_nesting_is_fine():
    nested = []
    for _ in range(48):
        nested = [nested]
    assert decode.decode_data("[" * 50 + "]" * 50) == [nested]


def test_lone_surrogate_escape_decodes_and_is_left_to_the_app():
    # The app refuses to queue it (test_app); decoding itself must not crash.
    assert decode.decode_data('{"event":"\\ud800"}') == [{"event": "\ud800"}]


@pytest.mark.parametrize("records", [
    [], [{}], [{"a": [1, 2]}], [[], [[]], {"b": "[", "c": "{["}], {"x": {"y": {}}},
    [{"event": "e", "properties": {"token": "t", "list": ["[", "]"]}}] * 3,
])
@pytest.mark.parametrize("form", ["json", "json bytes", "base64"])
def test_brackets_are_every_curly_and_square_one_of_the_json_text(records, form):
    text = json.dumps(records, separators=(",", ":"))
    value = {"json": text, "json bytes": text.encode(), "base64": b64(text)}[form]
    assert decode.decode_records(value)[2] == text.count("{") + text.count("[")
