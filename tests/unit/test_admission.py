"""Admission by what a request really costs, in-process: bodies charged to the in-flight
budget as they arrive and decompress (not as declared), the decompressed cap, the
whole-body deadline's answer, and the pauses a big request gives the others.

Drives the WSGI app with the golden harness's environs; no sockets, no eventlet.
"""
import io
import json

import pytest

from ingest.errors import IngestError
from ingest.http import make_app
from ingest.http.app import AppState, Charge
from ingest.http.request import read_body
from ingest.sinks.memory import MemorySink

from .golden.harness import Response, StaticRouter, call, check, environ, form, gz, make, settings

MiB = 1024 * 1024


def ev(n=0, **props):
    props.update(token="tok", n=n)
    return {"event": "e", "properties": props}


def big_form(records, pad):
    return form(data=json.dumps([ev(i, pad="x" * pad) for i in range(records)]))


def run(app, env):
    seen = {}

    def start_response(status, headers, exc_info=None):
        seen["status"], seen["headers"] = status, headers

    body = b"".join(app(env, start_response))
    response = Response(seen["status"], seen["headers"], body)
    check(response)
    return response


class Trickle(io.RawIOBase):
    """wsgi.input whose reads give `chunk` bytes, then time out (the worker's deadline)."""

    def __init__(self, chunk):
        self.chunk = chunk
        self.reads = 0

    def read(self, n=-1):
        self.reads += 1
        if self.reads > 1:
            raise TimeoutError("request body not received in time")
        return self.chunk


def test_gzip_body_over_the_decompressed_cap_is_413_under_it_accepted():
    body = big_form(50, 1000)
    app, sink = make(max_decompressed_bytes=len(body))
    r = call(app, "POST", "/track", "", gz(body), "application/x-www-form-urlencoded",
             headers={"Content-Encoding": "gzip"})
    assert r.body == b"1" and len(sink.items) == 50
    app, sink = make(max_decompressed_bytes=len(body) - 1)
    r = call(app, "POST", "/track", "", gz(body), "application/x-www-form-urlencoded",
             headers={"Content-Encoding": "gzip"})
    assert r.status == 413 and sink.items == []
    assert json.loads(r.body)["error"] == "decompressed body exceeds %d bytes" % (len(body) - 1)


def test_a_declared_length_reserves_nothing():
    """Budget 1 MiB; another request declared 10 MiB and sent 1 KB: the next is served."""
    state = AppState()
    app, sink = make(state=state, max_body_bytes_in_flight=MiB)
    other = Charge(state, MiB)
    other(1024)                                    # what the slow client has sent so far
    state.in_flight = 1
    r = call(app, "POST", "/track", "", form(data=json.dumps(ev())),
             "application/x-www-form-urlencoded")
    assert r.body == b"1"
    assert state.body_bytes == 1024                # its own share released when answered


def test_inflated_bytes_are_charged_and_refused_beyond_the_budget():
    state = AppState()
    app, sink = make(state=state, max_body_bytes_in_flight=MiB)
    held = Charge(state, MiB)
    held(MiB // 2)
    state.in_flight = 1
    body = gz(big_form(700, 1000))                 # ~40 KB on the wire, ~0.75 MB inflated
    assert len(body) < MiB // 8
    env = environ("POST", "/track", "", body, "application/x-www-form-urlencoded",
                  {"Content-Encoding": "gzip"})
    closed = []
    env["ingest.close"] = lambda: closed.append(1)
    r = run(app, env)
    assert r.status == 503 and r.headers["retry-after"] == "1" and sink.items == []
    assert closed == [1] and state.body_bytes == MiB // 2
    held.release()
    state.in_flight = 0
    r = call(app, "POST", "/track", "", body, "application/x-www-form-urlencoded",
             headers={"Content-Encoding": "gzip"})
    assert r.body == b"1" and len(sink.items) == 700   # alone, it is served


def test_a_body_past_its_deadline_is_408_and_the_connection_closed():
    app, sink = make()
    env = environ("POST", "/track", "", b"x", "application/x-www-form-urlencoded",
                  {"Content-Length": "100000"})
    env["wsgi.input"] = Trickle(b"data=")
    closed = []
    env["ingest.close"] = lambda: closed.append(1)
    r = run(app, env)
    assert r.status == 408 and closed == [1] and sink.items == []
    assert json.loads(r.body) == {"status": 0, "error": "request body not received in time"}


def test_read_body_charges_each_piece_before_reading_the_next():
    charged = []
    body = b"a" * (200 * 1024)

    def charge(n):
        charged.append(n)
        if sum(charged) > 100 * 1024:
            raise IngestError("overloaded")

    stream = io.BytesIO(body)
    env = {"CONTENT_LENGTH": str(len(body)), "wsgi.input": stream}
    with pytest.raises(IngestError):
        read_body(env, 10 * MiB, charge=charge)
    assert stream.tell() < len(body)               # refused before it was all read
    assert read_body({"CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body)},
                     10 * MiB) == body


def test_a_big_request_pauses_for_the_others():
    pauses = []
    app = make_app(settings(), MemorySink(), clock=lambda: 1.8e9, router=StaticRouter(),
                   pause=lambda: pauses.append(1))
    call(app, "POST", "/track", "", big_form(2000, 10), "application/x-www-form-urlencoded")
    assert len(pauses) >= 2000 // 250
    pauses.clear()
    call(app, "GET", "/track", "data=" + json.dumps(ev()))
    assert pauses == []                            # PERF: small requests never pause
