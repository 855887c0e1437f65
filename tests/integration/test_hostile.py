"""Hostile input against a real worker over raw sockets: every limit at and just over its
value, malformed requests, framing attacks, gzip bombs, injection, timeouts and caps.

Each request is written byte for byte on a plain socket (no HTTP library smoothing the
edges) and the answer is parsed strictly: a status line, headers, a Content-Length that
matches the body.  Known bugs are marked xfail(strict=True) with the exact request, so the
mark fails loudly the day the bug is fixed.  This module must not monkey-patch (the
worker is a separate eventlet process) and must not reach anything but 127.0.0.1.

The raw-HTTP layer (building, sending, strict parsing) is testkit/rawhttp.py.
"""
import functools
import gzip
import json
import os
import signal
import socket
import struct
import time
import zlib
from urllib.parse import quote

import pytest

from testkit.payloads import b64, b64_json, basic_auth, compact_json
from testkit.procs import QueueServer, Worker, rss_kib, wait_until
from testkit.rawhttp import (assert_clean, closed_by_peer, connect, exchange, read_response,
                             request)

TOKEN = "hostile-token"
DEFAULT_MAX_BODY = 10 * 1024 * 1024
# Small limits so "at" and "just over" are cheap to build; flag -> value.
LIMITS = {"max_request_line_bytes": 1000, "max_header_bytes": 500, "max_headers": 10,
          "max_body_bytes": 5000, "max_decompressed_bytes": 6000, "max_records": 5,
          "max_record_bytes": 2000,
          "max_properties": 10, "max_depth": 3, "max_string_chars": 100}


# ---- request builders ----------------------------------------------------------------

# JSON bodies keep non-ASCII characters as UTF-8: the byte and string limits count them so.
compact = functools.partial(compact_json, ensure_ascii=False)


def event(**props):
    props.setdefault("token", TOKEN)
    return {"event": "hostile", "properties": props}


def post_json(path, text, headers=()):
    body = text if isinstance(text, bytes) else text.encode("utf-8")
    return request("POST", path, (("Content-Type", "application/json"),) + tuple(headers), body)


def verbose(port, records, path="/track"):
    """POST records as JSON with verbose=1; returns the decoded verbose answer."""
    resp, _ = exchange(port, post_json(path + "?verbose=1", compact(records)))
    assert_clean(resp, 200)
    return json.loads(resp.body)


def assert_alive(worker):
    assert worker.proc.alive(), worker.proc.output()
    resp, _ = exchange(worker.port, request("GET", "/track?data=" + b64_json(event())))
    assert_clean(resp, 200)
    assert resp.body == b"1"


# ---- workers -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def queue(tmp_path_factory):
    server = QueueServer(tmp_path_factory.mktemp("hostile-queue")).start()
    yield server
    server.proc.stop()


def _module_worker(tmp_path_factory, queue, name, extra):
    return Worker(tmp_path_factory.mktemp(name), queue.address, extra=extra, name=name).start()


@pytest.fixture(scope="module")
def default_worker(tmp_path_factory, queue):
    w = _module_worker(tmp_path_factory, queue, "default", [])
    yield w
    w.proc.stop()


@pytest.fixture(scope="module")
def limited(tmp_path_factory, queue):
    extra = []
    for name, value in LIMITS.items():
        extra += ["--" + name.replace("_", "-"), str(value)]
    w = _module_worker(tmp_path_factory, queue, "limited", extra)
    yield w
    w.proc.stop()


# ---- request line (414) and header limits (400 / 431) ---------------------------------

def _request_line(n):
    """A valid /track request line of exactly n bytes including its CRLF."""
    head = "GET /track?data=%s&pad=" % b64_json(event())
    tail = " HTTP/1.1\r\n"
    return (head + "a" * (n - len(head) - len(tail)) + tail).encode("ascii")


def test_request_line_just_under_limit_is_served(limited):
    # eventlet refuses a line whose length including CRLF reaches the limit, so the
    # longest accepted request line is limit - 1 bytes with its CRLF (docs/limits.md).
    line = _request_line(LIMITS["max_request_line_bytes"] - 1)
    resp, _ = exchange(limited.port, line + b"Host: x\r\nConnection: close\r\n\r\n")
    assert_clean(resp, 200)
    assert resp.body == b"1"


@pytest.mark.parametrize("extra", [0, 1, 5000])
def test_request_line_at_or_over_limit_gets_414(limited, extra):
    line = _request_line(LIMITS["max_request_line_bytes"] + extra)
    resp, closed = exchange(limited.port, line + b"Host: x\r\nConnection: close\r\n\r\n")
    assert_clean(resp, 414)
    assert closed
    assert_alive(limited)


def test_default_url_limit_fits_a_large_sdk_get(default_worker):
    # The browser SDK batches into GET `data`; 50 events of ~600 bytes base64 to ~40 KB,
    # under the 64 KiB default.
    records = [event(distinct_id="user-%d" % i, pad="p" * 400, i=i) for i in range(50)]
    target = "/track?data=" + b64_json(records)
    assert 30000 < len(target) < 65536 - 20
    resp, _ = exchange(default_worker.port, request("GET", target))
    assert_clean(resp, 200)
    assert resp.body == b"1"


def test_default_url_limit_over_gets_414(default_worker):
    target = "/track?data=" + b64_json(event()) + "&pad=" + "a" * 70000
    # Only a little more than the limit is sent: the worker stops reading at 64 KiB.
    resp, closed = exchange(default_worker.port, request("GET", target)[:65536 + 100])
    assert_clean(resp, 414)
    assert closed


def _header_line(n):
    name = "X-Pad: "
    return (name + "a" * (n - len(name) - 2) + "\r\n").encode("ascii")


def test_header_line_just_under_limit_is_served(limited):
    raw = (b"GET /track?data=" + b64_json(event()).encode() + b" HTTP/1.1\r\n"
           + _header_line(LIMITS["max_header_bytes"] - 1) + b"Connection: close\r\n\r\n")
    resp, _ = exchange(limited.port, raw)
    assert_clean(resp, 200)


@pytest.mark.parametrize("extra", [0, 1, 20000])
def test_header_line_at_or_over_limit_gets_400_and_worker_stays_up(limited, extra):
    # eventlet answers an over-long header line with its own 400 and closes.
    raw = (b"GET /track?data=" + b64_json(event()).encode() + b" HTTP/1.1\r\n"
           + _header_line(LIMITS["max_header_bytes"] + extra) + b"Connection: close\r\n\r\n")
    resp, closed = exchange(limited.port, raw)
    assert_clean(resp, 400)
    assert closed
    assert_alive(limited)


def _with_header_lines(n):
    """A GET with exactly n header lines (Content-Type is one of them: the worker always
    sees a CONTENT_TYPE, so counting it keeps the total exact)."""
    lines = ["Connection: close", "Content-Type: text/plain"]
    lines += ["X-H%d: v" % i for i in range(n - len(lines))]
    return ("GET /track?data=%s HTTP/1.1\r\n%s\r\n\r\n"
            % (b64_json(event()), "\r\n".join(lines))).encode("ascii")


def test_header_count_at_limit_is_served(limited):
    resp, _ = exchange(limited.port, _with_header_lines(LIMITS["max_headers"]))
    assert_clean(resp, 200)
    assert resp.body == b"1"


def test_header_count_just_over_limit_gets_431(limited):
    resp, _ = exchange(limited.port, _with_header_lines(LIMITS["max_headers"] + 1))
    assert_clean(resp, 431)


def test_header_count_well_over_limit_gets_431(limited):
    resp, _ = exchange(limited.port, _with_header_lines(LIMITS["max_headers"] + 20))
    assert_clean(resp, 431)
    assert json.loads(resp.body) == {"status": 0, "error": "more than 10 header lines"}
    assert_alive(limited)


def test_default_header_count_at_limit_is_served(default_worker):
    resp, _ = exchange(default_worker.port, _with_header_lines(64))
    assert_clean(resp, 200)


def test_default_header_count_over_limit_gets_431(default_worker):
    resp, closed = exchange(default_worker.port, _with_header_lines(65))
    assert_clean(resp, 431)
    assert closed
    assert_alive(default_worker)


def test_total_header_size_over_64k_gets_400(default_worker):
    # eventlet's own cap on the whole header block (MAX_TOTAL_HEADER_SIZE, 64 KiB).
    lines = "".join("X-H%d: %s\r\n" % (i, "a" * 8000) for i in range(9))
    raw = ("GET /track?data=x HTTP/1.1\r\n%sConnection: close\r\n\r\n" % lines).encode()
    resp, closed = exchange(default_worker.port, raw)
    assert_clean(resp, 400)
    assert closed


# ---- body, records and record limits ---------------------------------------------------

def _form_body_of(n):
    body = "data=%s&pad=" % b64_json(event())
    return (body + "a" * (n - len(body))).encode("ascii")


def test_body_at_limit_is_served(limited):
    body = _form_body_of(LIMITS["max_body_bytes"])
    resp, _ = exchange(limited.port, request("POST", "/track", (("Content-Type", "text/plain"),), body))
    assert_clean(resp, 200)
    assert resp.body == b"1"


@pytest.mark.parametrize("extra", [1, 10 ** 6])
def test_body_over_limit_gets_413(limited, extra):
    body = _form_body_of(LIMITS["max_body_bytes"] + extra)
    raw = request("POST", "/track", (("Content-Type", "text/plain"),), body)
    # The worker answers from Content-Length alone and closes; body bytes it never reads
    # would make that close a reset racing the answer, so only the head is sent.
    resp, _ = exchange(limited.port, raw[:raw.index(b"\r\n\r\n") + 4])
    assert_clean(resp, 413)
    assert json.loads(resp.body) == {"status": 0, "error": "request body exceeds 5000 bytes"}


def test_declared_length_over_limit_gets_413_without_sending_the_body(limited):
    raw = request("POST", "/track", (("Content-Length", "99999999999999999999"),))
    resp, _ = exchange(limited.port, raw)
    assert_clean(resp, 413)


def test_expect_100_continue_gets_one_interim_answer_then_the_answer(default_worker):
    """A client that waits for 100 Continue before sending its body (curl does for large
    ones) gets exactly one, then the answer, and the connection serves the next request:
    the interim answer goes through the connection's buffered writer, the answer straight
    to the socket (wsgi_exchange.send_answer), in that order."""
    body = ("data=" + quote(b64_json(event()))).encode()
    head = request("POST", "/track", (("Content-Type", "application/x-www-form-urlencoded"),
                                      ("Expect", "100-continue"),
                                      ("Content-Length", str(len(body)))), close=False)
    with connect(default_worker.port) as sock:
        sock.sendall(head)
        interim = b""
        while b"\r\n\r\n" not in interim:
            chunk = sock.recv(65536)
            assert chunk, "closed before 100 Continue: %r" % interim
            interim += chunk
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        resp, extra = read_response(sock)
        assert_clean(resp, 200)
        assert extra == b""
        sock.sendall(request("GET", "/track?data=" + b64_json(event())))
        resp, extra = read_response(sock)
        assert_clean(resp, 200)
        assert extra == b"" and sock.recv(1) == b""


def test_expect_100_continue_refused_at_once_gets_no_interim_answer(limited):
    raw = request("POST", "/track", (("Expect", "100-continue"), ("Content-Length", "99999")),
                  close=False)
    with connect(limited.port) as sock:
        sock.sendall(raw)
        resp, extra = read_response(sock)
        assert_clean(resp, 413)
        assert not resp.raw.startswith(b"HTTP/1.1 100")
        assert extra == b"" and closed_by_peer(sock, 5.0)[1] == b""


@pytest.mark.parametrize("partial", [
    b"GET /track?data=",
    b"POST /track HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le",
    b"POST /track HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\ndata=abc",
], ids=["request line", "headers", "body"])
def test_a_client_resetting_mid_request_leaves_no_traceback(default_worker, partial):
    """A reset (RST) while the worker waits for the rest of a request ends that
    connection quietly, as the end of the stream would; everyone else is served."""
    before = default_worker.proc.output(limit=1 << 20).count("Traceback")
    sock = connect(default_worker.port)
    sock.sendall(partial)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    assert_alive(default_worker)
    assert default_worker.proc.output(limit=1 << 20).count("Traceback") == before


def test_chunked_body_over_limit_gets_413(limited):
    data = _form_body_of(LIMITS["max_body_bytes"] + 1)
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(data[i:i + 1000]), data[i:i + 1000])
                      for i in range(0, len(data), 1000)) + b"0\r\n\r\n"
    raw = request("POST", "/track", (("Content-Type", "text/plain"),
                                     ("Transfer-Encoding", "chunked"))) + chunks
    resp, _ = exchange(limited.port, raw)
    assert_clean(resp, 413)


def test_records_at_limit_are_accepted(limited):
    answer = verbose(limited.port, [event(i=i) for i in range(LIMITS["max_records"])])
    assert answer == {"status": 1, "error": None}


def test_records_over_limit_get_413(limited):
    resp, _ = exchange(limited.port, post_json(
        "/track", compact([event(i=i) for i in range(LIMITS["max_records"] + 1)])))
    assert_clean(resp, 413)
    assert json.loads(resp.body) == {"status": 0, "error": "6 records exceed the limit of 5"}


def _record_of(n):
    """A record whose stored JSON (with the 13-digit mp_processing_time_ms the worker adds)
    is exactly n bytes; strings stay within max_string_chars."""
    t = int(time.time()) - 60
    stored = lambda pad: compact({"event": "hostile", "properties": {
        "token": TOKEN, "time": t, "pad": pad, "mp_processing_time_ms": 1000000000000}})
    pad = []
    while len(stored(pad + ["a" * 100])) <= n:
        pad.append("a" * 100)
    pad.append("")
    pad[-1] = "a" * (n - len(stored(pad)))
    assert len(stored(pad)) == n
    return {"event": "hostile", "properties": {"token": TOKEN, "time": t, "pad": pad}}


def test_record_bytes_at_limit_accepted(limited):
    answer = verbose(limited.port, [_record_of(LIMITS["max_record_bytes"])])
    assert answer == {"status": 1, "error": None}


def test_record_bytes_over_limit_rejected_naming_the_record(limited):
    records = [event(), _record_of(LIMITS["max_record_bytes"] + 1)]
    answer = verbose(limited.port, records)
    assert answer == {"status": 1, "error": "record 1: record exceeds 2000 bytes"}


def test_properties_at_limit_accepted(limited):
    props = {"p%d" % i: i for i in range(LIMITS["max_properties"] - 1)}   # + token
    assert verbose(limited.port, [event(**props)]) == {"status": 1, "error": None}


def test_properties_over_limit_rejected(limited):
    props = {"p%d" % i: i for i in range(LIMITS["max_properties"])}
    answer = verbose(limited.port, [event(**props)])
    assert answer == {"status": 0, "error": "record 0: properties has more than 10 keys"}


def _nested(levels):
    value = "x"
    for _ in range(levels):
        value = [value]
    return value


def test_depth_at_limit_accepted(limited):
    answer = verbose(limited.port, [event(deep=_nested(LIMITS["max_depth"]))])
    assert answer == {"status": 1, "error": None}


def test_depth_over_limit_rejected(limited):
    answer = verbose(limited.port, [event(deep=_nested(LIMITS["max_depth"] + 1))])
    assert answer == {"status": 0, "error": "record 0: properties is nested deeper than 3 levels"}


def test_string_at_limit_accepted(limited):
    answer = verbose(limited.port, [event(s="\u00e9" * LIMITS["max_string_chars"])])
    assert answer == {"status": 1, "error": None}


def test_string_over_limit_rejected(limited):
    answer = verbose(limited.port, [event(s="\u00e9" * (LIMITS["max_string_chars"] + 1))])
    assert answer == {"status": 0,
                      "error": "record 0: properties has a string longer than 100 characters"}


def test_engage_operation_string_over_limit_rejected(limited):
    record = {"$token": TOKEN, "$distinct_id": "u", "$set": {"s": "a" * 101}}
    answer = verbose(limited.port, [record], path="/engage")
    assert answer == {"status": 0, "error": "record 0: $set has a string longer than 100 characters"}


# ---- malformed data: a well-formed answer, never a 500 -----------------------------------

def _get(data, extra=""):
    return request("GET", "/track?data=%s%s" % (data, extra))


MALFORMED = [
    # (name, request bytes, status, body)
    ("bad_base64", _get("!!!notbase64***"), 200, b"0"),
    ("bad_base64_verbose", _get("!!!notbase64***", "&verbose=1"), 200,
     b'{"status": 0, "error": "data is neither JSON nor valid base64"}'),
    ("bad_json", _get("%7B%22event%22%3A"), 200, b"0"),
    ("bad_json_in_base64", _get(b64(b'{"event":')), 200, b"0"),
    ("invalid_utf8_in_base64", _get(b64(b'{"event":"\xff\xfe"}'),
                                    "&verbose=1"), 200,
     b'{"status": 0, "error": "data is not valid UTF-8"}'),
    ("invalid_utf8_body", request("POST", "/track?verbose=1", (("Content-Type", "text/plain"),),
                                  b"data=%7B\xff\xfe"), 200,
     b'{"status": 0, "error": "request body is not valid UTF-8"}'),
    ("invalid_utf8_json_body", post_json("/track", b'{"event":"\xc3\x28"}'), 200, b"0"),
    ("nan", post_json("/track", '{"event":"e","properties":{"token":"t","x":NaN}}'), 200, b"0"),
    ("infinity", post_json("/track", '{"event":"e","properties":{"token":"t","x":-Infinity}}'),
     200, b"0"),
    ("huge_integer", post_json("/track", '[' + "9" * 5000 + ']'), 200, b"0"),
    ("data_is_a_number", _get("5"), 200, b"0"),
    ("data_is_a_string", _get(b64(b'"str"'), "&verbose=1"), 200,
     b'{"status": 0, "error": "data must be a JSON object or array"}'),
    ("missing_data", request("GET", "/track?verbose=1"), 200,
     b'{"status": 0, "error": "data parameter is missing"}'),
    ("deep_nesting", post_json("/track", "[" * 100000 + "]" * 100000), 400,
     b'{"status": 0, "error": "data is nested too deeply"}'),
    ("deep_nesting_in_get", _get("%5B" * 20000), 400,
     b'{"status": 0, "error": "data is nested too deeply"}'),
    ("unsupported_content_type", request("POST", "/track", (("Content-Type", "application/xml"),),
                                         b"<a/>"), 415,
     b'{"status": 0, "error": "body must be form-urlencoded, text/plain or JSON"}'),
    ("wrong_method", request("DELETE", "/track"), 405, b'{"status": 0, "error": "method not allowed"}'),
    ("unknown_path", request("GET", "/../../etc/passwd"), 404,
     b'{"status": 0, "error": "not found; use /track, /engage, /groups or /import"}'),
]


@pytest.mark.parametrize("name,raw,status,body", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_data_gets_a_clean_answer(default_worker, name, raw, status, body):
    resp, _ = exchange(default_worker.port, raw)
    assert_clean(resp, status)
    assert resp.body == body


# Per-record problems: the answer names the record index and the field.
BAD_RECORDS = [
    ("lone_surrogate", '{"event":"e","properties":{"token":"t","x":"\\ud800"}}',
     "record 1: record contains invalid Unicode (lone surrogate)"),
    ("float_overflow", '{"event":"e","properties":{"token":"t","x":1e400}}',
     "record 1: record contains a number out of range"),
    ("huge_time", '{"event":"e","properties":{"token":"t","time":' + "9" * 400 + '}}',
     "record 1: properties.time must be a number"),
    ("event_not_string", '{"event":5,"properties":{"token":"t"}}',
     "record 1: event must be a non-empty string"),
    ("properties_not_object", '{"event":"e","properties":[]}',
     "record 1: properties must be an object"),
    ("token_missing", '{"event":"e","properties":{}}', "record 1: properties.token is missing"),
    ("token_not_string", '{"event":"e","properties":{"token":["t"]}}',
     "record 1: properties.token must be a non-empty string"),
    ("record_not_object", '"just a string"', "record 1: record is not a JSON object"),
]


@pytest.mark.parametrize("name,record,error", BAD_RECORDS, ids=[b[0] for b in BAD_RECORDS])
def test_bad_record_is_rejected_by_index_and_field(default_worker, name, record, error):
    text = "[%s,%s]" % (compact(event()), record)
    resp, _ = exchange(default_worker.port, post_json("/track?verbose=1", text))
    assert_clean(resp, 200)
    assert json.loads(resp.body) == {"status": 1, "error": error}


def test_bad_engage_operation_type_is_rejected(default_worker):
    text = compact([{"$token": TOKEN, "$distinct_id": "u", "$set": ["not", "an", "object"]}])
    resp, _ = exchange(default_worker.port, post_json("/engage?verbose=1", text))
    assert_clean(resp, 200)
    assert json.loads(resp.body) == {"status": 0, "error": "record 0: $set must be an object"}


def test_input_is_not_echoed_in_error_bodies(default_worker):
    marker = "ECHOMARKER7f3a9c1e5b"
    for raw in (_get(marker), _get("%7B" + marker, "&verbose=1"),
                post_json("/track?verbose=1", '[{"event":"%s","properties":{}}]' % marker),
                request("GET", "/nowhere/" + marker),
                request("PUT", "/track?data=" + marker)):
        resp, _ = exchange(default_worker.port, raw)
        assert resp.status < 500
        assert marker.encode() not in resp.body, resp


# ---- framing: Content-Length / Transfer-Encoding -----------------------------------------

@pytest.mark.parametrize("value", ["-5", "abc", "1 0", "0x10", "\u0663".encode("utf-8").decode("latin-1")])
def test_negative_or_non_numeric_content_length_gets_400(default_worker, value):
    raw = ("POST /track HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: %s\r\n\r\n"
           "data=%s" % (value, b64_json(event()))).encode("latin-1")
    resp, closed = exchange(default_worker.port, raw)
    assert_clean(resp, 400)
    assert closed


def _padded_body(multiple):
    body = "data=%s&pad=" % b64_json(event())
    return (body + "a" * (-len(body) % multiple)).encode("ascii")


@pytest.mark.parametrize("form", ["sign", "underscore", "superscript"])
def test_content_length_with_sign_or_underscore_gets_400(default_worker, form):
    body = _padded_body(10)
    value = {"sign": "+%d" % len(body), "underscore": "%d_0" % (len(body) // 10),
             "superscript": "\xb2"}[form]      # str.isdigit() takes it, int() does not
    raw = request("POST", "/track", (("Content-Type", "text/plain"), ("Content-Length", value)), body)
    resp, _ = exchange(default_worker.port, raw)
    assert_clean(resp, 400)


def test_content_length_with_transfer_encoding_gets_400(default_worker):
    raw = (b"POST /track HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 4\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    resp, closed = exchange(default_worker.port, raw)
    assert_clean(resp, 400)
    assert closed
    assert_alive(default_worker)


def test_conflicting_content_lengths_get_400(default_worker):
    raw = (b"POST /track HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n"
           b"Content-Length: 7\r\nConnection: close\r\n\r\ndata=ab")
    resp, _ = exchange(default_worker.port, raw)
    assert_clean(resp, 400)


_CHUNK = ("data=" + b64_json(event())).encode()
_SMUGGLED = b"GET /smuggled?data=x HTTP/1.1\r\nHost: x\r\n\r\n"

# Framing a worker must refuse: each would make the framing check and eventlet's input
# stream disagree on where the body ends, so that the body is read as the next request.
_BAD_FRAMING = {
    "not chunked": b"HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\ndata=abc",
    # Two lines are joined ("chunked,chunked") in the environ, which the input stream
    # does not read as chunked (`ADD /smuggled` is a valid chunk size and method alike).
    "two lines": b"HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\nADD /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    # HTTP/1.0 has no chunked framing (RFC 9112 6.1: faulty framing), however spelled.
    **{"from %s" % version.decode(): version + b"\r\nHost: x\r\nTransfer-Encoding: chunked"
       b"\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(_CHUNK), _CHUNK)
       for version in (b"HTTP/1.0", b"HTTP/1.00", b"HTTP/01.0", b"HTTP/0.9")},
    # A lone CR ends a line for the email parser: a Transfer-Encoding a proxy that keeps
    # the line whole never saw would frame the body here.
    "lone CR in a value": b"HTTP/1.1\r\nHost: x\r\nX-A: a\rTransfer-Encoding: chunked\r\n"
                          b"\r\n5\r\nhello\r\n0\r\n\r\n",
    "CR before CRLF": b"HTTP/1.1\r\nHost: x\r\nX-A: a\r\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
}
# `chunked` followed by a character str.strip() removes but the environ keeps.
_BAD_FRAMING.update(
    ("chunked + %r" % tail, b"HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked" + tail +
     b"\r\n\r\n" + _SMUGGLED)
    for tail in (b"\xa0", b"\x85", b"\x0b", b"\x0c", b"\x1c", b"\x1f"))


@pytest.mark.parametrize("rest", list(_BAD_FRAMING.values()), ids=list(_BAD_FRAMING))
def test_ambiguous_framing_gets_400_and_a_closed_connection(default_worker, rest):
    resp, closed = exchange(default_worker.port, b"POST /track " + rest)
    assert_clean(resp, 400)
    assert closed


def test_valid_chunked_body_is_served(default_worker):
    data = ("data=" + b64_json(event())).encode()
    raw = request("POST", "/track", (("Content-Type", "text/plain"),
                                     ("Transfer-Encoding", "chunked"))) \
        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)
    resp, _ = exchange(default_worker.port, raw)
    assert_clean(resp, 200)
    assert resp.body == b"1"


def test_bad_chunk_size_gets_400(default_worker):
    raw = request("POST", "/track", (("Content-Type", "text/plain"),
                                     ("Transfer-Encoding", "chunked"))) + b"zz\r\nabc\r\n0\r\n\r\n"
    resp, _ = exchange(default_worker.port, raw)
    assert_clean(resp, 400)


def test_truncated_chunked_body_gets_400(default_worker):
    raw = request("POST", "/track", (("Content-Type", "text/plain"),
                                     ("Transfer-Encoding", "chunked"))) + b"100\r\ndata=abc"
    resp, _ = exchange(default_worker.port, raw)
    assert_clean(resp, 400)


def test_truncated_body_gets_400(default_worker):
    raw = request("POST", "/track", (("Content-Type", "text/plain"), ("Content-Length", "100")),
                  b"data=abc")
    resp, _ = exchange(default_worker.port, raw)
    assert_clean(resp, 400)
    assert json.loads(resp.body) == {"status": 0, "error": "request body ended early"}


def test_bad_http_version_gets_a_well_formed_400(default_worker):
    resp, _ = exchange(default_worker.port, b"GET /track?data=x HTTP/9.Z\r\nHost: x\r\n\r\n")
    assert_clean(resp, 400)


def test_bad_request_line_is_not_echoed(default_worker):
    marker = "ECHOMARKER0b1c2d3e4f"
    resp, _ = exchange(default_worker.port,
                       ("GET /track?data=%s extra HTTP/1.1\r\nHost: x\r\n\r\n" % marker).encode())
    assert_clean(resp, 400)
    assert marker.encode() not in resp.body


def test_bad_header_line_does_not_smuggle_the_body(default_worker):
    smuggled = ("GET /track?data=%s HTTP/1.1\r\nHost: x\r\n\r\n"
                % b64_json(event(n="smuggled"))).encode()
    raw = (b"POST /track HTTP/1.1\r\nHost: x\r\nX-Bad Name: v\r\nContent-Type: text/plain\r\n"
           b"Content-Length: %d\r\n\r\n" % len(smuggled)) + smuggled
    resp, closed = exchange(default_worker.port, raw)
    assert_clean(resp, 400)
    assert closed             # no second answer: the body was never run as a request


def test_head_answer_has_no_body(default_worker):
    with connect(default_worker.port) as sock:
        sock.sendall(b"HEAD /track?data=x HTTP/1.1\r\nHost: x\r\n\r\n")
        resp, left = read_response(sock, no_body=True)
        sock.sendall(request("GET", "/health", close=False))
        resp2, _ = read_response(sock, left)       # a stray HEAD body would come first
    assert resp.status == 405
    assert resp2.status == 200 and json.loads(resp2.body)["status"] == "ok"


# ---- Content-Encoding ----------------------------------------------------------------------

def _gzip_post(worker_port, compressed, encoding="gzip"):
    raw = request("POST", "/track?verbose=1", (("Content-Type", "text/plain"),
                                               ("Content-Encoding", encoding)), compressed)
    return exchange(worker_port, raw)[0]


def test_gzip_body_is_accepted(default_worker):
    resp = _gzip_post(default_worker.port, gzip.compress(("data=" + b64_json(event())).encode()))
    assert_clean(resp, 200)
    assert json.loads(resp.body) == {"status": 1, "error": None}


def test_gzip_decompressed_at_limit_accepted(limited):
    body = _form_body_of(LIMITS["max_decompressed_bytes"])
    assert len(body) > LIMITS["max_body_bytes"]        # the decompressed cap is its own
    resp = _gzip_post(limited.port, gzip.compress(body))
    assert_clean(resp, 200)
    assert json.loads(resp.body) == {"status": 1, "error": None}


def test_gzip_decompressed_over_limit_gets_413(limited):
    resp = _gzip_post(limited.port,
                      gzip.compress(_form_body_of(LIMITS["max_decompressed_bytes"] + 1)))
    assert_clean(resp, 413)
    assert json.loads(resp.body) == {"status": 0, "error": "decompressed body exceeds 6000 bytes"}


def _bomb(megabytes):
    """gzip of `megabytes` MB of zeros, built a megabyte at a time (about 1 KB per MB)."""
    packer = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    parts = [packer.compress(zeros) for _ in range(megabytes)]
    return b"".join(parts) + packer.flush()


def test_gzip_bomb_gets_413_and_memory_stays_bounded(default_worker):
    bomb = _bomb(512)       # 512 MB inflated, ~0.5 MB on the wire
    assert len(bomb) < DEFAULT_MAX_BODY
    before = rss_kib(default_worker.proc.pid)
    started = time.monotonic()
    resp = _gzip_post(default_worker.port, bomb)
    assert_clean(resp, 413)
    assert time.monotonic() - started < 5
    # inflating stops at the cap (10 MB) instead of 512 MB
    assert rss_kib(default_worker.proc.pid) - before < 100 * 1024
    assert_alive(default_worker)


@pytest.mark.parametrize("name,body", [
    ("not_gzip", b"data=plain-text-not-gzip"),
    ("truncated", gzip.compress(b"data=" + b"x" * 3000)[:40]),
    ("bad_crc", gzip.compress(b"data=abc")[:-8] + b"\x00" * 8),
    ("flipped", (lambda g: g[:15] + bytes([g[15] ^ 0xFF]) + g[16:])(gzip.compress(b"data=" * 50))),
])
def test_broken_gzip_gets_400(default_worker, name, body):
    resp = _gzip_post(default_worker.port, body)
    assert_clean(resp, 400)
    assert json.loads(resp.body)["status"] == 0


def test_unknown_content_encoding_gets_415(default_worker):
    resp = _gzip_post(default_worker.port, b"data=abc", encoding="br")
    assert_clean(resp, 415)


# ---- JSONP callback, redirect, /import credentials ----------------------------------------

@pytest.mark.parametrize("callback", [
    "alert(1)//", "</script><script>alert(1)</script>", "a;b", "a b", "1abc", "a..b", "a.",
    "x" * 129, "\u00e9t\u00e9", "a%0d%0aSet-Cookie:x",
])
def test_unsafe_callback_gets_400(default_worker, callback):
    resp, _ = exchange(default_worker.port,
                       _get(b64_json(event()), "&callback=" + quote(callback, safe="")))
    assert_clean(resp, 400)
    assert resp.body == b'{"status": 0, "error": "callback must be a JavaScript identifier or dotted path"}'
    assert resp.header("content-type") == "application/json"


def test_safe_callback_wraps_the_answer(default_worker):
    resp, _ = exchange(default_worker.port, _get(b64_json(event()), "&callback=mp.cb_1$"))
    assert_clean(resp, 200)
    assert resp.body == b"mp.cb_1$(1)"
    assert resp.header("content-type") == "text/javascript"


@pytest.mark.parametrize("target", [
    "javascript:alert(1)", "JaVaScRiPt:alert(1)", "data:text/html,<script>alert(1)</script>",
    "//evil.example", "/\\evil.example", "ftp://evil.example/", "http:///evil", "http:/\\evil",
    "https://ok.example/\r\nSet-Cookie: a=b", "http://ok.example/a b", "vbscript:x",
    "http://ok.example/\u00e9",
])
def test_unsafe_redirect_gets_400(default_worker, target):
    resp, _ = exchange(default_worker.port,
                       _get(b64_json(event()), "&redirect=" + quote(target, safe="")))
    assert_clean(resp, 400)
    assert resp.header("location") is None


def test_http_redirect_is_followed_with_302(default_worker):
    resp, _ = exchange(default_worker.port,
                       _get(b64_json(event()), "&redirect=https%3A%2F%2Fok.example%2Fthanks"))
    assert_clean(resp, 302)
    assert resp.header("location") == "https://ok.example/thanks"


@pytest.mark.parametrize("auth", [None, "Basic !!!", basic_auth("wrong"), "Bearer abc",
                                  "Basic " + b64(b"\xff\xfe:")])
def test_import_without_valid_credentials_gets_401(default_worker, auth):
    record = event(time=int(time.time()) - 100, distinct_id="d", **{"$insert_id": "i1"})
    headers = (("Authorization", auth),) if auth else ()
    resp, _ = exchange(default_worker.port, post_json("/import", compact([record]), headers))
    assert_clean(resp, 401)
    assert json.loads(resp.body) == {"status": 0, "error": "Invalid credentials"}
    resp, _ = exchange(default_worker.port, post_json("/import?strict=1", compact([record]), headers))
    assert_clean(resp, 401)
    assert json.loads(resp.body)["code"] == 401


# ---- timeouts and caps (each with its own worker) -----------------------------------------

def test_keepalive_idle_connection_is_closed(queue, make_worker):
    w = make_worker(queue.address, extra=["--keepalive-idle-s", "1"])
    with connect(w.port) as sock:
        raw = request("GET", "/track?data=" + b64_json(event()), close=False)
        sock.sendall(raw)
        resp, _ = read_response(sock)
        assert_clean(resp, 200)
        sock.sendall(raw)             # still open while not idle for long
        resp, _ = read_response(sock)
        assert_clean(resp, 200)
        waited, got = closed_by_peer(sock, timeout=5)
    assert got == b""
    assert 0.8 < waited < 3, waited
    assert_alive(w)


def test_client_silent_after_connecting_is_dropped_after_idle_timeout(queue, make_worker):
    w = make_worker(queue.address, extra=["--keepalive-idle-s", "1", "--read-timeout-s", "30"])
    with connect(w.port) as sock:
        waited, got = closed_by_peer(sock, timeout=5)
    # Before the request line the idle timeout applies, not the read timeout.
    assert got == b"" and 0.8 < waited < 3, waited


def test_client_stalling_in_headers_is_dropped_after_read_timeout(queue, make_worker):
    w = make_worker(queue.address, extra=["--read-timeout-s", "1", "--keepalive-idle-s", "30"])
    with connect(w.port) as sock:
        sock.sendall(b"GET /track?data=x HTTP/1.1\r\nHost: x\r\nX-Half: ")
        waited, got = closed_by_peer(sock, timeout=5)
    assert got == b"", got          # dropped silently: nothing to answer yet
    assert 0.8 < waited < 3, waited
    assert_alive(w)


def test_client_stalling_in_body_is_not_answered_500(queue, make_worker):
    w = make_worker(queue.address, extra=["--read-timeout-s", "1"])
    with connect(w.port) as sock:
        sock.sendall(request("POST", "/track", (("Content-Type", "text/plain"),
                                                ("Content-Length", "100")), b"data="))
        waited, got = closed_by_peer(sock, timeout=5)
    assert 0.8 < waited < 3, waited
    assert b" 500 " not in got[:20], got


def test_connection_cap_queues_extra_connections(queue, make_worker):
    """With --max-connections 3, three idle keep-alive connections fill the worker: a
    fourth connection is accepted by the kernel but not served (its request waits) until
    one of the three closes; the three keep being served meanwhile."""
    w = make_worker(queue.address, extra=["--max-connections", "3", "--keepalive-idle-s", "30"])
    raw = request("GET", "/track?data=" + b64_json(event()), close=False)
    held = [connect(w.port) for _ in range(3)]
    try:
        for sock in held:
            sock.sendall(raw)
            assert_clean(read_response(sock)[0], 200)
        extra = connect(w.port)
        extra.sendall(raw)
        extra.settimeout(1.0)
        with pytest.raises(socket.timeout):
            extra.recv(1)                       # waiting: the pool is full
        for sock in held:                       # existing connections still served
            sock.sendall(raw)
            assert_clean(read_response(sock)[0], 200)
        held.pop().close()
        extra.settimeout(3.0)
        started = time.monotonic()
        resp, _ = read_response(extra)
        assert_clean(resp, 200)
        assert time.monotonic() - started < 2
        extra.close()
    finally:
        for sock in held:
            sock.close()
    assert w.proc.alive()


def test_in_flight_cap_answers_503_with_retry_after(queue, make_worker, tmp_path):
    """--max-in-flight 1: while one /track waits on a stopped (SIGSTOP) queue server, the
    next /track gets 503 + Retry-After: 1; after SIGCONT the first is stored (200 `1`)."""
    q = QueueServer(tmp_path, name="stoppable").start()
    w = make_worker(q.address, extra=["--max-in-flight", "1", "--kestrel-timeout-ms", "10000"])
    assert_alive(w)                                  # opens the Kestrel connection
    slow = connect(w.port, timeout=15)
    try:
        os.kill(q.proc.pid, signal.SIGSTOP)
        slow.sendall(request("GET", "/track?data=" + b64_json(event(n="slow"))))

        def in_flight():
            resp, _ = exchange(w.port, request("GET", "/metrics"))
            return b"ingest_requests_in_flight 1.0" in resp.body
        wait_until(in_flight, timeout=5, message="the slow request to be in flight")
        resp, _ = exchange(w.port, request("GET", "/track?data=" + b64_json(event(n="busy"))))
        assert_clean(resp, 503)
        assert resp.header("retry-after") == "1"
        assert json.loads(resp.body) == {"status": 0, "error": "server busy; retry"}
        os.kill(q.proc.pid, signal.SIGCONT)
        resp, _ = read_response(slow)
        assert_clean(resp, 200)
        assert resp.body == b"1"
    finally:
        os.kill(q.proc.pid, signal.SIGCONT)
        slow.close()
        q.proc.stop()


def trickle(sock, data, every_s=0.2):
    """Send `data` a byte at a time, one every `every_s`, until the worker closes the
    connection: (whether it did, seconds from the first byte)."""
    started = time.monotonic()
    for byte in data:
        try:
            sock.sendall(bytes([byte]))
            sock.settimeout(every_s)
            if sock.recv(1) == b"":
                return True, time.monotonic() - started
        except socket.timeout:
            continue                      # the worker is still reading: go on trickling
        except OSError:
            return True, time.monotonic() - started
    return False, time.monotonic() - started


def test_an_unread_body_trickled_after_the_answer_is_cut_at_the_body_deadline(
        queue, make_worker):
    """A body the app did not read (/health reads none) is read and dropped after the
    answer, on a connection kept alive; the whole-body deadline bounds that too: one
    byte every 0.2 s (each read well inside the 5 s read timeout) is dropped after
    about 1 s, not after the 40 s the 200 bytes would take."""
    w = make_worker(queue.address, extra=["--body-timeout-s", "1", "--read-timeout-s", "5",
                                          "--keepalive-idle-s", "30"])
    with connect(w.port) as sock:
        sock.sendall(b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 200\r\n\r\n")
        resp, _ = read_response(sock)
        assert resp.status == 200
        dropped, waited = trickle(sock, b"a" * 200)
    assert dropped and waited < 3, (dropped, waited)
    assert_alive(w)


def test_client_trickling_its_request_line_is_dropped_after_the_read_timeout(
        queue, make_worker):
    """Each byte of a request line used to get a whole keep-alive wait (30 s here), so a
    client sending one a second held its connection for as long as the line allows
    (64 KiB by default).  Once the line has begun, the rest of it gets the read timeout as a whole:
    one byte every 0.2 s is dropped after about 1 s, on a fresh connection (with and
    without keep-alive) and on a kept-alive one after an answered request."""
    w = make_worker(queue.address, extra=["--read-timeout-s", "1", "--keepalive-idle-s", "30"])
    with connect(w.port) as sock:
        dropped, waited = trickle(sock, b"GET /track?data=" + b"a" * 40)
    assert dropped and 0.8 < waited < 3, (dropped, waited)
    # Without keep-alive each read waited the read timeout (1 s; 0.2 s per byte here).
    still = make_worker(queue.address, name="no-keepalive",
                        extra=["--read-timeout-s", "1", "--keepalive-idle-s", "0"])
    with connect(still.port) as sock:
        dropped, waited = trickle(sock, b"GET /track?data=" + b"a" * 40)
    assert dropped and 0.8 < waited < 3, (dropped, waited)
    with connect(w.port) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        resp, _ = read_response(sock)
        assert resp.status == 200
        dropped, waited = trickle(sock, b"GET /health" + b"?" * 40)
    assert dropped and 0.8 < waited < 3, (dropped, waited)
    assert_alive(w)


def test_client_trickling_headers_is_dropped_after_the_read_timeout(queue, make_worker):
    """The read timeout bounds the whole header block, not each read: one byte every
    0.2 s (each read well inside a 1 s timeout) is still dropped after about 1 s."""
    w = make_worker(queue.address, extra=["--read-timeout-s", "1", "--keepalive-idle-s", "30"])
    with connect(w.port) as sock:
        sock.sendall(b"GET /track?data=x HTTP/1.1\r\n")
        dropped, waited = trickle(sock, b"X-Slow: " + b"a" * 40)
    assert dropped and 0.8 < waited < 3, (dropped, waited)
    assert_alive(w)
