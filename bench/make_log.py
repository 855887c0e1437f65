"""Write a synthetic access log in the JSON-lines format deploy/nginx.conf writes.

    python -m bench.make_log --requests N --out FILE [--seed S] [--start-time EPOCH]
        [--rate R] [--only SHAPE] [--batch-size B]

The mix imitates what the three official SDKs send (docs/http-api.md):
browser batch POSTs and legacy GETs, Node GETs with base64 `data` and unescaped-base64
batch POSTs, Python form POSTs with naked JSON, `/engage` profile updates, and about 1%
malformed requests (bad base64, truncated JSON, no `data`).  Batch sizes, property counts
and value sizes are drawn from skewed distributions so that most requests are small and a
few are large, as in production traffic.

Requests are logged `--rate` per second from `--start-time` (default: 1,000/s from now),
with nginx's one-second time stamps.  Event times are near the request's time; /track
refuses events more than five days old, so replay an old log with `--shift-time` (or
regenerate it).  This module only writes a file; it never talks to a server.
"""
import argparse
import functools
import json
import math
import random
import sys
import time
import urllib.parse
import uuid

from testkit.payloads import b64, b64_json, compact_json

# The SDKs write non-ASCII characters as UTF-8, not as \u escapes.
_json = functools.partial(compact_json, ensure_ascii=False)
_b64 = functools.partial(b64_json, ensure_ascii=False)

# (name, weight): the share of each request shape in the log.
SHAPES = (
    ("browser_batch_track", 30),
    ("browser_get_track", 18),
    ("node_get_track", 15),
    ("node_batch_track", 7),
    ("python_post_track", 8),
    ("python_batch_track", 4),
    ("browser_batch_engage", 6),
    ("node_get_engage", 4),
    ("python_post_engage", 4),
    ("browser_beacon_track", 3),
)
MALFORMED_SHARE = 0.01
FORM = "application/x-www-form-urlencoded"

BROWSERS = (("Chrome", "131.0"), ("Safari", "18.1"), ("Firefox", "133.0"),
            ("Mobile Safari", "17.6"), ("Microsoft Edge", "131.0"))
OSES = ("Windows", "Mac OS X", "iOS", "Android", "Linux")
PAGES = ("/", "/pricing", "/docs/getting-started", "/blog/launch", "/signup",
         "/account/settings", "/product/features?ref=nav", "/checkout/step-2")
EVENT_NAMES = ("Page View", "Button Clicked", "Signed Up", "Added To Cart", "Purchase",
               "Video Played", "Search", "$identify", "Session Start", "Form Submitted")
WORDS = ("alpha", "bravo", "charlie", "delta", "échelle", "日本語", "zulu", "naïve",
         "campaign", "summer_sale", "premium", "trial", "north", "😀 emoji")
UA_BROWSER = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 "
              "(KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36")
UA_PYTHON = "python-requests/2.32.3"


class Generator:
    """Draws requests; one Random instance so a seed reproduces the whole file."""

    def __init__(self, seed, start_time, only=None, batch=None):
        self.rnd = random.Random(seed)
        self.start_time = start_time
        self.only = only            # one request shape instead of the mix
        self.batch = batch          # a fixed batch size instead of the distribution
        self.tokens = ["%032x" % self.rnd.getrandbits(128) for _ in range(20)]
        # Zipf-like: a few projects send most of the traffic.
        self.token_weights = [1.0 / (i + 1) for i in range(len(self.tokens))]
        self.shape_names = [name for name, _ in SHAPES]
        self.shape_weights = [w for _, w in SHAPES]

    # ---- value distributions --------------------------------------------------------
    def token(self):
        return self.rnd.choices(self.tokens, self.token_weights)[0]

    def batch_size(self):
        """1..50, most batches small: half geometric (mean ~3), half uniform."""
        if self.batch:
            return self.batch
        if self.rnd.random() < 0.6:
            n = 1 + int(math.log(1.0 - self.rnd.random()) / math.log(0.65))
        else:
            n = self.rnd.randint(1, 50)
        return max(1, min(50, n))

    def n_custom_properties(self):
        """Lognormal with median ~6, capped at 80 (a few events carry very many)."""
        return max(0, min(80, int(self.rnd.lognormvariate(math.log(6), 0.9))))

    def string(self):
        length = max(1, min(255, int(self.rnd.lognormvariate(math.log(10), 1.0))))
        word = self.rnd.choice(WORDS)
        return (word * (length // len(word) + 1))[:length]

    def value(self):
        r = self.rnd.random()
        if r < 0.5:
            return self.string()
        if r < 0.7:
            return self.rnd.randint(0, 100000)
        if r < 0.8:
            return round(self.rnd.uniform(0, 1000), 2)
        if r < 0.9:
            return self.rnd.random() < 0.5
        if r < 0.95:
            return [self.string() for _ in range(self.rnd.randint(0, 5))]
        return None

    def custom_properties(self):
        return {"prop_%d" % self.rnd.randint(0, 200): self.value()
                for _ in range(self.n_custom_properties())}

    def event_time(self, t):
        return round(t - self.rnd.uniform(0, 30), 3)

    def device(self):
        return str(uuid.UUID(int=self.rnd.getrandbits(128), version=4))

    # ---- records, per SDK -----------------------------------------------------------
    def browser_event(self, t):
        browser, version = self.rnd.choice(BROWSERS)
        device = self.device()
        props = {
            "$os": self.rnd.choice(OSES), "$browser": browser,
            "$current_url": "https://www.example.com" + self.rnd.choice(PAGES),
            "$browser_version": float(version.split(".")[0]),
            "$screen_height": self.rnd.choice((768, 900, 1080, 1440)),
            "$screen_width": self.rnd.choice((1366, 1440, 1920, 2560)),
            "mp_lib": "web", "$lib_version": "2.83.0",
            "$insert_id": "%016x" % self.rnd.getrandbits(64),
            "time": self.event_time(t), "distinct_id": "$device:" + device,
            "$device_id": device, "token": self.token(),
        }
        props.update(self.custom_properties())
        return {"event": self.rnd.choice(EVENT_NAMES), "properties": props}

    def node_event(self, t):
        props = {"distinct_id": "user-%d" % self.rnd.randint(1, 10 ** 6), "token": self.token(),
                 "mp_lib": "node", "$lib_version": "0.24.0"}
        if self.rnd.random() < 0.5:
            props["time"] = int(self.event_time(t) * 1000)  # a JS Date: integer ms
        props.update(self.custom_properties())
        return {"event": self.rnd.choice(EVENT_NAMES), "properties": props}

    def python_event(self, t):
        props = {"token": self.token(), "distinct_id": "user-%d" % self.rnd.randint(1, 10 ** 6),
                 "time": self.event_time(t), "$insert_id": "%032x" % self.rnd.getrandbits(128),
                 "mp_lib": "python", "$lib_version": "5.4.1"}
        props.update(self.custom_properties())
        return {"event": self.rnd.choice(EVENT_NAMES), "properties": props}

    def engage_update(self, t, with_time):
        update = {"$token": self.token(), "$distinct_id": "user-%d" % self.rnd.randint(1, 10 ** 6)}
        op = self.rnd.choice(("$set", "$set", "$set_once", "$add", "$union", "$unset"))
        if op == "$add":
            update[op] = {"logins": self.rnd.randint(1, 3)}
        elif op == "$union":
            update[op] = {"tags": [self.string() for _ in range(self.rnd.randint(1, 3))]}
        elif op == "$unset":
            update[op] = ["prop_%d" % self.rnd.randint(0, 200)]
        else:
            update[op] = self.custom_properties() or {"plan": self.string()}
        if with_time:
            update["$time"] = self.event_time(t)
        return update

    # ---- requests: (method, uri, content_type, body, user_agent) -----------------------
    def request(self, t):
        shape = self.only or self.rnd.choices(self.shape_names, self.shape_weights)[0]
        return getattr(self, "_" + shape)(t)

    def _browser_batch_track(self, t):
        events = [self.browser_event(t) for _ in range(self.batch_size())]
        return self._browser_post("/track/", events, t)

    def _browser_batch_engage(self, t):
        updates = [self.engage_update(t, False) for _ in range(max(1, self.batch_size() // 4))]
        return self._browser_post("/engage/", updates, t)

    def _browser_post(self, path, records, t):
        data = urllib.parse.quote(_b64(records), safe="")  # encodeURIComponent
        uri = "%s?verbose=1&ip=1&_=%d" % (path, int(t * 1000))
        return "POST", uri, FORM, "data=" + data, UA_BROWSER

    def _browser_beacon_track(self, t):
        events = [self.browser_event(t) for _ in range(self.batch_size())]
        body = "data=" + urllib.parse.quote(_b64(events), safe="")
        uri = "/track/?verbose=1&ip=1&_=%d" % int(t * 1000)
        return "POST", uri, "text/plain;charset=UTF-8", body, UA_BROWSER

    def _browser_get_track(self, t):
        data = urllib.parse.quote(_b64(self.browser_event(t)), safe="")
        return "GET", "/track/?data=%s&ip=1&_=%d" % (data, int(t * 1000)), "", "", UA_BROWSER

    def _node_get_track(self, t):
        return self._node_get("/track", self.node_event(t))

    def _node_get_engage(self, t):
        return self._node_get("/engage", self.engage_update(t, False))

    def _node_get(self, path, record):
        query = urllib.parse.urlencode({"ip": 0, "verbose": 0, "data": _b64(record)})
        return "GET", path + "?" + query, "", "", ""

    def _node_batch_track(self, t):
        events = [self.node_event(t) for _ in range(self.batch_size())]
        # Node writes the base64 raw into the form body: '+' is not escaped (mixpanel-api.md 1.3).
        return "POST", "/track?ip=0&verbose=0", FORM, "data=" + _b64(events), ""

    def _python_post_track(self, t):
        return self._python_post("/track", self.python_event(t))

    def _python_batch_track(self, t):
        return self._python_post("/track", [self.python_event(t) for _ in range(self.batch_size())])

    def _python_post_engage(self, t):
        return self._python_post("/engage", self.engage_update(t, True))

    def _python_post(self, path, record):
        body = urllib.parse.urlencode({"data": _json(record), "verbose": 1, "ip": 0})
        return "POST", path, FORM, body, UA_PYTHON

    # ---- malformed ----------------------------------------------------------------------
    def malformed(self, t):
        kind = self.rnd.randrange(4)
        if kind == 0:  # not base64 at all
            return "GET", "/track?ip=0&verbose=0&data=%21%21not-base64%21%21", "", "", ""
        if kind == 1:  # valid base64 of truncated JSON
            text = _json(self.node_event(t))
            data = b64(text[: len(text) // 2])
            return "GET", "/track?" + urllib.parse.urlencode({"data": data}), "", "", ""
        if kind == 2:  # a POST without a data field
            return "POST", "/track/?verbose=1&ip=1", FORM, "verbose=1&ip=1", UA_BROWSER
        # an event without a token
        event = {"event": "Orphan", "properties": {"distinct_id": "x"}}
        return "POST", "/track?verbose=1", FORM, "data=" + urllib.parse.quote(_json(event)), ""


def log_line(t, method, uri, content_type, body, user_agent, status, rnd):
    """One captured line as nginx's `ingest_access` log_format writes it (escape=json)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(t))
    remote_addr = "203.0.113.%d" % rnd.randint(1, 254)
    request_time = round(rnd.uniform(0.0005, 0.004), 3)
    # Key order and value types follow deploy/nginx.conf's log_format exactly.
    fields = [("time", stamp), ("remote_addr", remote_addr), ("x_forwarded_for", ""),
              ("method", method), ("path", uri.split("?", 1)[0]), ("status", status),
              ("content_type", content_type),
              ("request_length", len(uri) + len(body.encode("utf-8")) + 120),
              ("request_time", request_time), ("bytes_sent", 1 if status == 200 else 60),
              ("upstream", "127.0.0.1:8100"), ("user_agent", user_agent), ("uri", uri),
              ("body", body)]
    return "{" + ",".join(json.dumps(k) + ":" + json.dumps(v, ensure_ascii=False)
                          for k, v in fields) + "}\n"


def generate(path, requests, seed=1, start_time=None, only=None, batch=None, rate=1000.0):
    """Write `requests` lines to `path`, `rate` per recorded second; returns the count of
    malformed ones.

    `only` (a SHAPES name) writes that request shape alone and no malformed requests,
    `batch` fixes the batch size: the single-event and batch benchmarks use
    only="node_get_track" and only="node_batch_track", batch=50."""
    start_time = time.time() if start_time is None else start_time
    gen = Generator(seed, start_time, only, batch)
    share = 0.0 if only else MALFORMED_SHARE
    malformed = 0
    with open(path, "w", encoding="utf-8") as out:
        for i in range(requests):
            t = start_time + i / rate
            if gen.rnd.random() < share:
                malformed += 1
                req, status = gen.malformed(t), 400
            else:
                req, status = gen.request(t), 200
            out.write(log_line(t, *req, status=status, rnd=gen.rnd))
    return malformed


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.make_log", description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, required=True, help="number of log lines")
    p.add_argument("--out", required=True, help="file to write")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--start-time", type=float, default=None,
                   help="epoch seconds for the first request (default: now)")
    p.add_argument("--only", choices=[name for name, _ in SHAPES], default=None,
                   help="write only this request shape (no malformed requests)")
    p.add_argument("--batch-size", type=int, default=None, help="fixed records per batch (1-50)")
    p.add_argument("--rate", type=float, default=1000.0,
                   help="requests per recorded second (default 1000)")
    args = p.parse_args(argv)
    if args.requests <= 0:
        p.error("--requests must be positive")
    if args.rate <= 0:
        p.error("--rate must be positive")
    if args.batch_size is not None and not 1 <= args.batch_size <= 2000:
        p.error("--batch-size must be between 1 and 2000")
    bad = generate(args.out, args.requests, args.seed, args.start_time, args.only,
                   args.batch_size, args.rate)
    print("wrote %d requests (%d malformed) to %s" % (args.requests, bad, args.out),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
