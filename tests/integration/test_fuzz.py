"""Integration fuzz: 2,400 mutated SDK-shaped requests against one real worker.

A seeded mutator (random.Random(SEED): every run sends the same requests, only the events'
`time` follows the clock) starts from the
requests the SDKs really send (browser GET with base64 `data`, sendBeacon text/plain,
Python form POST of raw JSON, Node base64 body, /engage, /groups, /import with Basic auth,
JSON and gzip bodies) and damages them: bit flips, truncation, duplicated / removed /
swapped parameters, random bytes in base64, random header values, huge numbers, deep
nesting, invalid UTF-8, lone surrogates, NaN, wrong methods, random paths, broken
framing.  Requests go over raw sockets: well-framed ones several to a keep-alive
connection, byte-damaged ones one per connection with `Connection: close` and a
half-close so the worker never waits for bytes that will not come.

One run (module fixture) feeds several tests: the worker stays alive and its VmRSS
bounded; every answer is HTTP with a Content-Length matching its body; no 5xx but 503; no
traceback; no long unique marker (planted in the input) echoed; no body after HEAD.
Any such outcome fails the run.
The pytest process is not monkey-patched; only 127.0.0.1 is contacted.
"""
import base64
import collections
import gzip
import json
import random
import select
import socket
import time
from urllib.parse import quote, quote_plus, unquote, unquote_plus

import pytest

from testkit.payloads import b64, b64_json, basic_auth, compact_json
from testkit.procs import QueueServer, Worker, open_fds, rss_kib, wait_until
from testkit.rawhttp import Malformed, connect, read_response, roundtrip, send

SEED = 20261126
REQUESTS = 2400
MARKER = "QZXMARK9d2f6a0c4e8b1735"      # long and unique: never in any answer we write
TOKEN = "fuzz-token"
SECRET = "fuzz-secret"
RSS_LIMIT_KB = 200 * 1024
RSS_GROWTH_KB = 50 * 1024
PER_CONNECTION = 6                   # well-framed requests sent on one keep-alive connection


# ---- SDK-shaped seeds -----------------------------------------------------------------------

class Req:
    """A request still in parts, so structured mutations keep the framing right."""

    def __init__(self, method, path, params, headers, body_params=None, body=None, ctype=None):
        self.method, self.path = method, path
        self.params = list(params)              # query (name, value) pairs, values unquoted
        self.headers = list(headers)
        self.body_params = body_params          # form pairs, or None
        self.body = body                        # raw bytes body, or None
        self.ctype = ctype
        self.encode_gzip = False

    def copy(self):
        other = Req(self.method, self.path, self.params, self.headers,
                    list(self.body_params) if self.body_params is not None else None,
                    self.body, self.ctype)
        other.encode_gzip = self.encode_gzip
        return other

    def to_bytes(self, close):
        query = "&".join("%s=%s" % (k, quote_plus(v, safe="=/:")) for k, v in self.params)
        target = self.path + ("?" + query if query else "")
        body = b""
        if self.body_params is not None:
            body = "&".join("%s=%s" % (k, v) for k, v in self.body_params).encode("utf-8", "surrogatepass")
        elif self.body is not None:
            body = self.body
        headers = [("Host", "127.0.0.1")] + self.headers
        if self.ctype:
            headers.append(("Content-Type", self.ctype))
        if self.encode_gzip and body:
            body = gzip.compress(body, compresslevel=1, mtime=0)
            headers.append(("Content-Encoding", "gzip"))
        if body or self.method == "POST":
            headers.append(("Content-Length", str(len(body))))
        headers.append(("Connection", "close" if close else "keep-alive"))
        head = "%s %s HTTP/1.1\r\n" % (self.method, target)
        head += "".join("%s: %s\r\n" % (k, v) for k, v in headers) + "\r\n"
        return head.encode("latin-1", "replace") + body


def _event(rng, i, now):
    return {"event": "fuzz %d" % i, "properties": {
        "token": TOKEN, "distinct_id": "%s-%d" % (MARKER, i), "time": now - 30,
        "$insert_id": "ins-%d" % i, "n": rng.randint(0, 10 ** 6), "f": rng.random(),
        "tags": ["a", "b"], "nested": {"k": [1, {"z": None}]}, "$browser": "Firefox"}}


def seeds(rng, i, now):
    """All SDK shapes for record number i (one is picked per request)."""
    one, batch = _event(rng, i, now), [_event(rng, i * 10 + k, now) for k in range(3)]
    engage = {"$token": TOKEN, "$distinct_id": MARKER, "$set": {"plan": "pro", "n": i}}
    group = {"$token": TOKEN, "$group_key": "company", "$group_id": "g%d" % i,
             "$set": {"name": MARKER}}
    auth = basic_auth(SECRET)
    browser = [("User-Agent", "Mozilla/5.0"), ("Origin", "http://site.example")]
    return [
        Req("GET", "/track", [("data", b64_json(one)), ("ip", "1"), ("_", str(i)),
                              ("mk", MARKER)], browser),
        Req("POST", "/track", [("ip", "1"), ("mk", MARKER)], browser,
            body_params=[("data", quote(b64_json(batch), safe=""))], ctype="text/plain"),
        Req("POST", "/track", [], [("User-Agent", "mixpanel-python/5.4.1")],
            body_params=[("data", quote_plus(compact_json(batch))), ("verbose", "1"), ("ip", "0")],
            ctype="application/x-www-form-urlencoded"),
        Req("POST", "/track", [("ip", "0"), ("verbose", "1")], [("User-Agent", "node")],
            body_params=[("data", b64_json(batch))],
            ctype="application/x-www-form-urlencoded"),
        Req("GET", "/engage", [("data", b64_json(engage)), ("verbose", "1"), ("mk", MARKER)],
            browser),
        Req("POST", "/groups", [("verbose", "1")], [],
            body_params=[("data", quote_plus(compact_json([group])))],
            ctype="application/x-www-form-urlencoded"),
        Req("POST", "/import", [("strict", "1"), ("project_id", "1")], [("Authorization", auth)],
            body=compact_json(batch).encode(), ctype="application/json"),
        Req("POST", "/track", [("verbose", "1")], [], body=compact_json(batch).encode(),
            ctype="application/json"),
    ]


# ---- mutations --------------------------------------------------------------------------------

HUGE = ["1" + "0" * 400, "9" * 5000, "1e400", "-1e999", "NaN", "Infinity", "-0", "1e-400",
        "123456789012345678901234567890"]
JUNK_VALUES = ["", " ", "\x00", "\u00ff\u00fe", "%", "%zz", "%00", "=", "&&&", "\u2028",
               "A" * 3000, "[]", "{}", "null", "0", "-1", "true", MARKER]


def _data_slot(req):
    """(list, index) of the `data` pair, in the body or the query; None if absent."""
    for pairs in (req.body_params, req.params):
        if pairs:
            for idx, (k, _) in enumerate(pairs):
                if k == "data":
                    return pairs, idx
    return None


def _json_text(req):
    """The JSON text of the request's records and a setter writing it back, encoded the
    way this request carries it (raw body, urlencoded or base64)."""
    if req.body is not None and req.ctype == "application/json":
        def put(text):
            req.body = text.encode("utf-8", "surrogatepass")
        try:
            return req.body.decode("utf-8"), put
        except UnicodeDecodeError:
            return None, None
    slot = _data_slot(req)
    if slot is None:
        return None, None
    pairs, idx = slot
    value = pairs[idx][1]
    raw_json = value.startswith("%7B") or value.startswith("%5B") or value[:1] in "{["
    if raw_json:
        text = unquote_plus(value)

        def put(new):
            pairs[idx] = ("data", quote_plus(new) if pairs is req.body_params else new)
        return text, put
    try:
        text = base64.b64decode(unquote(value)).decode("utf-8")
    except ValueError:      # an earlier mutation already broke it
        return None, None

    def put(new):
        encoded = b64(new)
        pairs[idx] = ("data", quote(encoded, safe="") if pairs is req.body_params else encoded)
    return text, put


def m_json_splice(rng, req):
    """Replace a number, string or value in the JSON text with something hostile."""
    text, put = _json_text(req)
    if text is None:
        return "none"
    choice = rng.choice(["huge", "nan", "surrogate", "deep", "type", "truncate", "flip", "long"])
    if choice == "huge":
        text = text.replace('"n":', '"n":%s,"x":' % rng.choice(HUGE), 1)
    elif choice == "nan":
        text = text.replace('"f":', '"f":NaN,"g":', 1)
    elif choice == "surrogate":
        text = text.replace('"Firefox"', '"\\ud800Fire\\udfff"', 1)
    elif choice == "deep":
        depth = rng.choice([21, 50, 5000, 60000])
        text = text.replace('"tags":', '"tags":' + "[" * depth + "]" * depth + ',"t2":', 1)
    elif choice == "type":
        target = rng.choice(['"event":', '"properties":', '"token":', '"$set":', '"time":'])
        text = text.replace(target, target + rng.choice(["5", "[]", "null", '""', "{}",
                                                         "true", '"x"', "1e308"]) + ',"zz":', 1)
    elif choice == "truncate":
        text = text[:rng.randrange(len(text))]
    elif choice == "flip":
        chars = list(text)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(len(chars))
            chars[pos] = chr(ord(chars[pos]) ^ (1 << rng.randrange(7)))
        text = "".join(chars)
    else:
        text = text.replace('"a"', '"%s"' % ("\u00e9" * rng.choice([65536, 65537, 100000])), 1)
    put(text)
    return "json_" + choice


def m_base64_noise(rng, req):
    slot = _data_slot(req)
    if slot is None:
        return "none"
    pairs, idx = slot
    value = list(pairs[idx][1])
    for _ in range(rng.randint(1, 5)):
        value.insert(rng.randrange(len(value) + 1), rng.choice("!@#$^*()~` \t=.-_+/%\u00e9\x7f"))
    pairs[idx] = ("data", "".join(value))
    return "base64_noise"


def m_params(rng, req):
    pairs = req.body_params if req.body_params and rng.random() < 0.5 else req.params
    op = rng.choice(["dup", "remove", "swap", "add", "junk"])
    if op == "dup" and pairs:
        pairs.append(rng.choice(pairs))
    elif op == "remove" and pairs:
        pairs.pop(rng.randrange(len(pairs)))
    elif op == "swap" and len(pairs) > 1:
        a, b = rng.sample(range(len(pairs)), 2)
        pairs[a], pairs[b] = (pairs[a][0], pairs[b][1]), (pairs[b][0], pairs[a][1])
    elif op == "junk" and pairs:
        idx = rng.randrange(len(pairs))
        pairs[idx] = (pairs[idx][0], rng.choice(JUNK_VALUES))
    else:
        name = rng.choice(["data", "verbose", "callback", "img", "redirect", "ip", "strict",
                           "api_key", "test", "%64ata", "da ta", ""])
        value = rng.choice(["1", "0", "cb", "a.b", "alert(1)", "javascript:alert(1)",
                            "http://x.example/", "//evil", MARKER] + JUNK_VALUES[:6])
        pairs.append((name, value))
    return "params_" + op


def m_invalid_utf8(rng, req):
    junk = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80"])
    if req.body_params is not None:       # freeze the form into bytes first
        req.body = "&".join("%s=%s" % p for p in req.body_params).encode("utf-8", "surrogatepass")
        req.body_params = None
    if req.body is not None:
        pos = rng.randrange(len(req.body) + 1)
        req.body = req.body[:pos] + junk + req.body[pos:]
    else:
        slot = _data_slot(req)
        if slot is None:
            return "none"
        pairs, idx = slot
        pairs[idx] = ("data", pairs[idx][1] + "".join("%%%02X" % b for b in junk))
    return "invalid_utf8"


def m_headers(rng, req):
    name = rng.choice(["X-Fuzz", "User-Agent", "Origin", "Accept", "Cookie", "Referer",
                       "X-Forwarded-For", "Authorization", "Content-Encoding", "Expect",
                       "Access-Control-Request-Headers", "Content-Type", "Range", "Upgrade",
                       "Host", "If-None-Match", "\x7fBad", "X-\u00e9"])
    alphabet = [chr(c) for c in range(0x20, 0x7f)] + ["\t", "\u00ff", "\u00e9", "\x00", "\x01"]
    value = "".join(rng.choice(alphabet) for _ in range(rng.choice([0, 1, 8, 64, 2000])))
    if name == "Content-Type":
        req.ctype = value
    else:
        req.headers.append((name, value))
    return "header_" + name


def m_method(rng, req):
    req.method = rng.choice(["PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "CONNECT",
                             "get", "POST", "GET", "BREW", "G\u00c9T", "X" * 300])
    return "method"


def m_path(rng, req):
    req.path = rng.choice(["/", "/track/", "/prefix/track", "//track", "/track%00", "/../import",
                           "/TRACK", "/engage/../track", "/metrics", "/health", "/ready",
                           "/" + MARKER, "/%ff%fe", "/track;x=1", "*", "/" + "a" * 5000,
                           "/track/" + "/" * 100, "/import/", "/groups?x"])
    return "path"


def m_gzip(rng, req):
    req.encode_gzip = True
    return "gzip"


def m_repeat(rng, req):
    """A valid batch of many records, some over the record limit."""
    if req.body is not None and req.ctype == "application/json":
        try:
            records = json.loads(req.body)
            assert isinstance(records, list) and records
        except (ValueError, AssertionError):
            return "none"
        n = rng.choice([500, 2000, 2001, 3000])
        req.body = compact_json([records[0]] * n).encode()
        return "many_records"
    return "none"


STRUCTURED = [m_json_splice] * 6 + [m_base64_noise] * 2 + [m_params] * 3 + [m_invalid_utf8] * 2 \
    + [m_headers] * 3 + [m_method, m_path, m_gzip, m_repeat]


# Mutations after serialisation: framing may be broken, so one request per connection.

def r_bitflip(rng, raw):
    data = bytearray(raw)
    for _ in range(rng.randint(1, 8)):
        pos = rng.randrange(len(data))
        data[pos] ^= 1 << rng.randrange(8)
    return bytes(data), "raw_bitflip"


def r_truncate(rng, raw):
    return raw[:rng.randrange(len(raw))], "raw_truncate"


def r_insert(rng, raw):
    pos = rng.randrange(len(raw))
    junk = bytes(rng.randrange(256) for _ in range(rng.randint(1, 40)))
    return raw[:pos] + junk + raw[pos:], "raw_insert"


def r_requestline(rng, raw):
    """Damage the request line itself (space in the URL, bad version, extra words)."""
    line, rest = raw.split(b"\r\n", 1)
    method, target, version = line.split(b" ", 2)
    choice = rng.choice(["space", "version", "words", "lf", "empty"])
    if choice == "space":
        cut = rng.randrange(1, len(target) + 1)
        line = b"%s %s %s %s" % (method, target[:cut], target[cut:] or b"x", version)
    elif choice == "version":
        line = b"%s %s %s" % (method, target, rng.choice([b"HTTP/9.9", b"HTTP/1", b"HTPT/1.1",
                                                          b"HTTP/1.1x", b"http/1.1"]))
    elif choice == "words":
        line = b"%s %s" % (method, target)           # HTTP/0.9 style
    elif choice == "lf":
        return raw.replace(b"\r\n", b"\n"), "raw_lf_only"
    else:
        line = b""
    return line + b"\r\n" + rest, "raw_requestline_" + choice


def r_framing(rng, raw):
    """Conflicting or broken framing headers."""
    head, _, body = raw.partition(b"\r\n\r\n")
    choice = rng.choice(["cl_te", "neg", "nonnum", "short", "long", "chunked_bad", "te_other",
                         "two_cl"])
    lines = [l for l in head.split(b"\r\n") if not l.lower().startswith(b"content-length")]
    if choice == "cl_te":
        lines += [b"Content-Length: %d" % len(body), b"Transfer-Encoding: chunked"]
    elif choice == "neg":
        lines.append(b"Content-Length: -%d" % (len(body) or 1))
    elif choice == "nonnum":
        lines.append(b"Content-Length: " + rng.choice([b"abc", b"1e3", b"0x20", b" ", b"1,2"]))
    elif choice == "short":
        lines.append(b"Content-Length: %d" % (len(body) + rng.randint(1, 5000)))
    elif choice == "long":
        lines.append(b"Content-Length: %d" % max(0, len(body) - rng.randint(1, 20)))
    elif choice == "chunked_bad":
        lines.append(b"Transfer-Encoding: chunked")
        body = rng.choice([b"zz\r\n" + body, b"%x\r\n" % (len(body) + 100) + body,
                           b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)])
    elif choice == "te_other":
        lines.append(b"Transfer-Encoding: " + rng.choice([b"gzip", b"identity", b"chunked, gzip"]))
    else:
        lines += [b"Content-Length: %d" % len(body), b"Content-Length: %d" % (len(body) + 3)]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body, "raw_framing_" + choice


RAW = [r_bitflip, r_truncate, r_insert, r_requestline, r_framing]


def corpus(now, seed=SEED, n=REQUESTS):
    """[(mode, bytes, label)], mode 'keep' (well framed) or 'close' (one per connection);
    `now` (whole seconds) goes into the events' time."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        req = rng.choice(seeds(rng, i, now)).copy()
        labels = []
        for _ in range(rng.choice([0, 1, 1, 1, 2, 2, 3])):
            labels.append(rng.choice(STRUCTURED)(rng, req))
        if rng.random() < 0.3:
            raw, label = rng.choice(RAW)(rng, req.to_bytes(close=True))
            out.append(("close", raw, "+".join(labels + [label])))
        else:
            close = rng.random() < 0.25
            out.append(("close" if close else "keep", req.to_bytes(close=close),
                        "+".join(labels) or "valid"))
    return out


# ---- running it ------------------------------------------------------------------------------

class Outcome:
    def __init__(self, label, raw, kind, responses=(), detail="", data=b""):
        self.label, self.raw, self.kind = label, raw, kind
        self.responses, self.detail, self.data = list(responses), detail, data

    def __repr__(self):
        return "<%s %s %s %r req=%r>" % (self.kind, self.label, self.detail,
                                         [r.raw[:160] for r in self.responses], self.raw[:200])


def _is_head(raw):
    return raw.startswith(b"HEAD ")


def _read_all_responses(sock, head=False):
    """Every response until the worker closes (close mode: the request may have split).
    `head`: the request was HEAD, so its (first) answer has no body."""
    responses, buf = [], b""
    while True:
        try:
            resp, buf = read_response(sock, buf, no_body=head and not responses)
        except EOFError:
            return responses, None
        except ConnectionResetError:
            # After an answer, a reset only means the worker closed with request bytes
            # unread (a 414 stops reading at 64 KiB); before any answer it is a failure.
            if responses:
                return responses, None
            raise
        except Malformed as exc:
            return responses, exc
        responses.append(resp)


def _send_close(port, raw, label):
    with connect(port, timeout=5) as sock:
        send(sock, raw, half_close=True)
        try:
            responses, malformed = _read_all_responses(sock, head=_is_head(raw))
        except socket.timeout:
            return Outcome(label, raw, "timeout")
        except ConnectionResetError:
            return Outcome(label, raw, "reset")
    if malformed:
        return Outcome(label, raw, "malformed", responses, str(malformed), malformed.data)
    if not responses:
        return Outcome(label, raw, "no_answer")
    return Outcome(label, raw, "answered", responses)


class KeepAlive:
    """Well-framed requests one after another on one connection, reconnecting when the
    worker closes (after a Connection: close answer, an error, or PER_CONNECTION uses).

    The worker may end a keep-alive connection after any answer (HTTP allows it; eventlet
    does so when the app left body bytes unread), so a request that finds its reused
    connection already closed, before any answer byte, is sent again once on a fresh
    connection, as HTTP clients do; `stale` counts those."""

    def __init__(self, port):
        self.port, self.sock, self.used, self.stale = port, None, 0, 0

    def send(self, raw, label):
        if self.sock is not None and self._closed_by_worker():
            self.stale += 1
            self.close()
        outcome = self._send(raw, label)
        if outcome.kind == "no_answer" and outcome.detail.startswith("reused"):
            self.stale += 1
            outcome = self._send(raw, label)
        return outcome

    def _send(self, raw, label):
        if self.sock is None or self.used >= PER_CONNECTION:
            self.close()
            self.sock, self.used = connect(self.port, timeout=5), 0
        self.used += 1
        reused = self.used > 1
        try:
            send(self.sock, raw)   # the worker may answer (414, 413) before taking it all
            # An answer to HEAD has a Content-Length but no body.
            resp, extra = read_response(self.sock, no_body=_is_head(raw))
        except Malformed as exc:
            self.close()
            return Outcome(label, raw, "malformed", detail=str(exc), data=exc.data)
        except socket.timeout:
            self.close()
            return Outcome(label, raw, "timeout")
        except (EOFError, OSError) as exc:
            self.close()
            return Outcome(label, raw, "no_answer",
                           detail=("reused " if reused else "fresh ") + repr(exc))
        if extra:
            self.close()
            return Outcome(label, raw, "extra_bytes", [resp], repr(extra[:100]))
        if (resp.header("connection") or "").lower() == "close" or resp.version == "HTTP/1.0":
            self.close()
        return Outcome(label, raw, "answered", [resp])

    def _closed_by_worker(self):
        readable, _, _ = select.select([self.sock], [], [], 0)
        return bool(readable)      # nothing is expected: readable means EOF (or stray bytes)

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None


@pytest.fixture(scope="module")
def fuzz_run(tmp_path_factory):
    """Run the whole corpus once; returns outcomes, RSS samples and the worker state."""
    base = tmp_path_factory.mktemp("fuzz")
    requests = corpus(int(time.time()))
    queue = QueueServer(base).start()
    worker = Worker(base, queue.address, name="fuzzworker",
                    extra=["--read-timeout-s", "2", "--keepalive-idle-s", "5",
                           "--trusted-proxies", "127.0.0.1/32"]).start()
    try:
        pid = worker.proc.pid
        _one_valid_request(worker.port)      # opens the Kestrel connection before counting
        fds_before = open_fds(pid)
        keep = KeepAlive(worker.port)
        outcomes, rss = [], [(0, rss_kib(pid))]
        started = time.monotonic()
        for n, (mode, raw, label) in enumerate(requests, 1):
            if mode == "keep":
                outcomes.append(keep.send(raw, label))
            else:
                outcomes.append(_send_close(worker.port, raw, label))
            if n % 100 == 0:
                rss.append((n, rss_kib(pid)))
        keep.close()
        elapsed = time.monotonic() - started
        yield {"outcomes": outcomes, "stale": keep.stale, "rss": rss, "elapsed": elapsed,
               "alive": worker.proc.alive(), "worker": worker, "fds_before": fds_before,
               "log": worker.proc.output(20000)}
    finally:
        worker.proc.stop()
        queue.proc.stop()


def _one_valid_request(port):
    data = b64(b'{"event":"probe","properties":{"token":"t"}}')
    return roundtrip(port, ("GET /track?data=%s HTTP/1.1\r\nHost: x\r\n\r\n" % data).encode())


def violations(outcome):
    """[(problem, known bug or None)] for one outcome."""
    found = []
    if outcome.kind in ("timeout", "reset", "extra_bytes"):
        found.append((outcome.kind, None))
    if _is_head(outcome.raw) and any(r.body for r in outcome.responses[:1]):
        found.append(("head_body", None))
    if outcome.kind == "no_answer" and "raw_" not in outcome.label:
        found.append(("no_answer", None))
    if outcome.kind == "malformed":
        found.append(("not_http", None))
    for resp in outcome.responses:
        if resp.status >= 500 and resp.status != 503:
            found.append(("5xx", None))
        if b"Traceback" in resp.body or b'File "' in resp.body:
            found.append(("traceback", None))
        if MARKER.encode() in _not_callback(resp) or (outcome.kind == "malformed"
                                            and MARKER.encode() in outcome.data):
            found.append(("marker_echo", None))
    return found


def _not_callback(resp):
    """The body without its JSONP callback name (a valid identifier, echoed on purpose)."""
    if resp.header("content-type") == "text/javascript":
        return resp.body[resp.body.find(b"("):]
    return resp.body


def _problems(fuzz_run, kinds):
    out = []
    for o in fuzz_run["outcomes"]:
        for problem, bug in violations(o):
            if problem in kinds:
                out.append((problem, bug, o))
    return out


def _summary(problems, limit=5):
    counts = collections.Counter((p, b) for p, b, _ in problems)
    return "%s\nfirst: %r" % (dict(counts), [o for _, _, o in problems[:limit]])


# ---- the assertions -----------------------------------------------------------------------------

def test_fuzz_corpus_is_large_varied_and_deterministic():
    a, b = corpus(1800000000), corpus(1800000000)
    assert [r for _, r, _ in a] == [r for _, r, _ in b]
    assert len(a) >= 2000
    labels = collections.Counter(l.split("+")[-1].split("_")[0] for _, _, l in a)
    modes = collections.Counter(m for m, _, _ in a)
    assert modes["keep"] > 500 and modes["close"] > 500
    for family in ("json", "base64", "params", "invalid", "header", "method", "path", "gzip",
                   "raw", "valid"):
        assert labels[family] >= 20, labels


def test_fuzz_worker_alive_and_memory_bounded(fuzz_run):
    assert fuzz_run["alive"], fuzz_run["log"]
    rss = fuzz_run["rss"]
    assert max(kb for _, kb in rss) < RSS_LIMIT_KB, rss
    after_500 = [kb for n, kb in rss if n >= 500]
    assert max(after_500) - after_500[0] < RSS_GROWTH_KB, rss
    assert fuzz_run["elapsed"] < 40, fuzz_run["elapsed"]
    # it still does its job, and every fuzz connection was let go
    w = fuzz_run["worker"]
    resp = _one_valid_request(w.port)
    assert (resp.status, resp.body) == (200, b"1")
    wait_until(lambda: open_fds(w.proc.pid) <= fuzz_run["fds_before"] + 1, timeout=10,
               message="the worker's descriptors to return to %d" % fuzz_run["fds_before"])


def test_fuzz_most_requests_get_an_answer(fuzz_run):
    kinds = collections.Counter(o.kind for o in fuzz_run["outcomes"])
    answered = kinds["answered"]
    assert answered >= 0.85 * len(fuzz_run["outcomes"]), kinds
    statuses = collections.Counter(r.status for o in fuzz_run["outcomes"] for r in o.responses)
    # the mutations reach every layer: accepted, rejected, refused, too large, unknown path
    for status in (200, 400, 404, 405, 413, 414, 415):
        assert statuses[status] > 0, statuses


def test_fuzz_no_unknown_failure(fuzz_run):
    """No 5xx but 503, always HTTP, never a traceback or the marker, no hang, no stray
    bytes on a keep-alive connection, no body after HEAD."""
    unknown = _problems(fuzz_run, {"timeout", "reset", "extra_bytes", "no_answer", "not_http",
                                   "5xx", "traceback", "marker_echo", "head_body"})
    assert not unknown, _summary(unknown)


def test_fuzz_no_traceback_in_any_body(fuzz_run):
    found = _problems(fuzz_run, {"traceback"})
    assert not found, _summary(found)


def test_fuzz_no_5xx_other_than_503(fuzz_run):
    found = _problems(fuzz_run, {"5xx"})
    assert not found, _summary(found)


def test_fuzz_every_answer_is_http_with_matching_length(fuzz_run):
    found = _problems(fuzz_run, {"not_http"})
    assert not found, _summary(found)


def test_fuzz_marker_never_echoed(fuzz_run):
    found = _problems(fuzz_run, {"marker_echo"})
    assert not found, _summary(found)
