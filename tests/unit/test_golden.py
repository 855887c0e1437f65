"""Golden replay: recorded SDK requests (tests/unit/golden/*.json) replayed through the app
under wsgiref.validate; the response and the queue items must match exactly.

py_*/node_* were recorded from the official SDKs by golden/record_sdks.py; hand_* are the
browser shapes of mixpanel-api.md 1.4 and the section 6.2 cases, from
golden/write_browser_cases.py; phone_* are the Android, Swift, iPhone, React Native and
Flutter shapes, built byte for byte as those SDKs build them by
golden/write_phone_cases.py, each with what its SDK does with the answer.  Expected items
were derived from the record contract, not from ingest's own output.
"""
import base64
import glob
import json
import os
import struct

import pytest

from .golden import write_phone_cases
from .golden.harness import call, make
from .golden.phone_wire import READERS

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
CASES = sorted(glob.glob(os.path.join(GOLDEN, "*.json")))



def load(path):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def params():
    for path in CASES:
        name = os.path.basename(path)
        yield pytest.param(path, id=name[:-5])


def test_there_are_golden_cases_from_every_source():
    names = [os.path.basename(p) for p in CASES]
    for prefix in ("py_", "node_", "hand_browser_", "hand_compat", "phone_android_",
                   "phone_swift_", "phone_iphone_", "phone_rn_", "phone_flutter_"):
        assert any(n.startswith(prefix) for n in names), prefix
    assert len(names) >= 30


@pytest.mark.parametrize("path", list(params()))
def test_golden_case(path):
    case = load(path)
    req, want = case["request"], case["response"]
    app, sink = make(case.get("routes"), now=case["clock"])
    sink.failing = case.get("sink") == "failing"
    body = (base64.b64decode(req["body_base64"]) if "body_base64" in req
            else req.get("body", "").encode("utf-8"))
    headers = dict(req.get("headers", {}))
    ctype = headers.pop("Content-Type", None)
    r = call(app, req["method"], req["path"], req.get("query", ""),
             body if (body or req["method"] == "POST") else None, ctype, headers,
             remote=case.get("remote", "203.0.113.7"))
    assert r.status == want["status"], r
    if "content_type" in want:
        assert r.headers.get("content-type") == want["content_type"]
    if "body" in want:
        assert r.body == want["body"].encode("utf-8")
    if "json" in want:
        assert json.loads(r.body) == want["json"]
    if want.get("content_type") == "image/gif":
        assert r.body[:6] in (b"GIF87a", b"GIF89a")
        assert struct.unpack("<HH", r.body[6:10]) == (1, 1)
    for name, value in want.get("headers", {}).items():
        assert r.headers.get(name.lower()) == value, name
    assert sink.items == [(queue, payload.encode("utf-8")) for queue, payload in case["items"]]
    if "sdk" in case:
        # What the SDK does with this answer: delete the batch, retry it, drop a record.
        assert READERS[case["sdk"]["reads"]](r.status, r.body) == case["sdk"]["outcome"], r


def test_phone_cases_are_what_their_writer_writes():
    """The phone_* files are generated, never edited by hand: regenerate them with
    `python -m tests.unit.golden.write_phone_cases` after changing the writer."""
    written = dict(write_phone_cases.cases())
    on_disk = {os.path.basename(p)[:-5] for p in CASES if os.path.basename(p).startswith("phone_")}
    assert on_disk == set(written)
    for name, case in written.items():
        with open(os.path.join(GOLDEN, name + ".json"), encoding="utf-8") as fh:
            assert fh.read() == write_phone_cases.render(case), name
