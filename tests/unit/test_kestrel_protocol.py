"""Request-line parsing and formatting shared by the queue server and client (no sockets)."""
import pytest

from ingest.kestrel import protocol as proto
from ingest.kestrel.protocol import GetRequest, ProtocolError


@pytest.mark.parametrize("key, expected", [
    ("q", GetRequest("q")),
    ("q/t=500", GetRequest("q", timeout_ms=500)),
    ("q/open", GetRequest("q", open=True)),
    ("q/close", GetRequest("q", close=True)),
    ("q/abort", GetRequest("q", abort=True)),
    ("q/peek", GetRequest("q", peek=True)),
    ("q/close/open", GetRequest("q", open=True, close=True)),
    ("q/open/close", GetRequest("q", open=True, close=True)),
    ("q/close/open/t=0", GetRequest("q", timeout_ms=0, open=True, close=True)),
    ("q/t=10/peek", GetRequest("q", timeout_ms=10, peek=True)),
    ("q/abort/t=10", GetRequest("q", timeout_ms=10, abort=True)),
    ("q/bogus/open", GetRequest("q", open=True)),          # unknown options ignored
    ("Mixed+Case_q-1/open", GetRequest("Mixed+Case_q-1", open=True)),
])
def test_parse_get_key(key, expected):
    assert proto.parse_get_key(key) == expected


@pytest.mark.parametrize("key", [
    "q/peek/open", "q/open/peek", "q/peek/close", "q/abort/open", "q/open/abort",
    "q/abort/close", "q/peek/abort", "/open", "", "q/t=", "q/t=-5", "q/t=1.5", "q/t=x",
])
def test_parse_get_key_refuses(key):
    with pytest.raises(ProtocolError):
        proto.parse_get_key(key)


def test_split_request_lowercases_command_only_and_strips_cr():
    assert proto.split_request(b"GeT MyQueue/OPEN\r") == [b"get", b"MyQueue/OPEN"]
    assert proto.split_request(b"set q 0 0 5") == [b"set", b"q", b"0", b"0", b"5"]
    assert proto.split_request(b"get  q") == [b"get", b"", b"q"]    # naggati: single spaces
    assert proto.split_request(b"") == [b""]


@pytest.mark.parametrize("exptime, expected", [
    (0, 0),
    (1, 1_000_000 + 1000),
    (999_999, 1_000_000 + 999_999_000),
    (1_000_000, 1_000_000_000),
    (1_700_000_000, 1_700_000_000_000),
    (-1, 999_999),
])
def test_expiry_ms_memcache_rules(exptime, expected):
    assert proto.expiry_ms(exptime, now_ms=1_000_000) == expected


@pytest.mark.parametrize("name, ok", [
    ("events", True), ("a+b", True), ("A_z-0", True), ("", False), ("a.b", False),
    ("a/b", False), ("a~b", False), ("a b", False), ("a\nb", False), ("x" * 200, True),
    ("x" * 201, False),
])
def test_valid_queue_name(name, ok):
    assert proto.valid_queue_name(name) is ok


def test_format_set_and_value():
    assert proto.format_set("q", b"a\r\nb", 5) == b"set q 0 5 4\r\na\r\nb\r\n"
    assert proto.format_set("q", b"") == b"set q 0 0 0\r\n\r\n"
    assert proto.format_value(b"q", b"xy") == b"VALUE q 0 2\r\nxy\r\nEND\r\n"
