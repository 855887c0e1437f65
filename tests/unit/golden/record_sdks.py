"""Developer tool, not a test: record what the official SDKs put on the wire and write
golden cases (tests/unit/golden/*.json) for tests/unit/test_golden.py.

Run by hand:  .venv/bin/python -m tests.unit.golden.record_sdks
It starts a capture server on 127.0.0.1 (ephemeral port, answers like Mixpanel), drives
the Python SDK (mixpanel 5.4.1, in-process) and the Node SDK (mixpanel 0.24.0 through
tests/js/node_sdk.js), and writes one case per request.  The expected queue items are
computed here from the record contract (DESIGN.md), independently of ingest.clean, so
the replay test compares two separate readings of the spec.  Review every diff before
committing new cases.  It talks to nothing but 127.0.0.1.
"""
import base64
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
TOKEN = "goldtok"
SECRET = "s3cret"
ROUTES = {"secrets": {TOKEN: SECRET}}
QUEUES = {"track": "events", "engage": "people", "groups": "groups", "import": "imports"}
KEEP_HEADERS = ("content-type", "authorization", "origin", "x-forwarded-for")


class Capture(BaseHTTPRequestHandler):
    seen = []

    def _handle(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        path, _, query = self.path.partition("?")
        headers = {k: v for k, v in self.headers.items() if k.lower() in KEEP_HEADERS}
        self.seen.append({"method": self.command, "path": path, "query": query,
                          "headers": headers, "body": body})
        verbose = "verbose=1" in query or b"verbose=1" in body
        out = b'{"status": 1, "error": null}' if verbose else b"1"
        self.send_response(200)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = _handle

    def log_message(self, *args):
        pass


def run_python(base):
    import mixpanel
    from mixpanel import BufferedConsumer, Consumer, Mixpanel, ServiceAccountCredentials
    urls = dict(events_url=base + "/track", people_url=base + "/engage",
                groups_url=base + "/groups", import_url=base + "/import")
    mp = Mixpanel(TOKEN, consumer=Consumer(**urls))
    mp.track("u1", "Signed Up", {"plan": "pro", "name": "Zoë 😀", "note": "a b+c&d=e%"})
    mp.people_set("u1", {"$email": "u1@example.com", "age": 30})
    mp.people_increment("u1", {"logins": 1})
    mp.people_unset("u1", ["age"])
    mp.group_set("company", "acme", {"size": 10})
    buffered = Mixpanel(TOKEN, consumer=BufferedConsumer(max_size=3, **urls))
    for i in range(3):
        buffered.track("u%d" % i, "Batch", {"i": i})
    old = int(time.time()) - 30 * 86400
    mp.import_data("project-api-key", "u1", "Old Event", old, {"$insert_id": "imp-py-1"},
                   api_secret=SECRET)
    sa = Mixpanel(TOKEN, consumer=Consumer(credentials=ServiceAccountCredentials(
        "sa.user", SECRET, "12345"), **urls))
    sa.import_data(None, "u1", "SA Event", old, {"$insert_id": "imp-py-2"})
    return "python mixpanel %s" % mixpanel.__version__


def run_node(port):
    ms = int(time.time() * 1000)
    client = {"token": TOKEN, "options": {"host": "127.0.0.1:%d" % port, "protocol": "http",
                                         "key": SECRET}}
    geo = {"token": TOKEN, "options": {"host": "127.0.0.1:%d" % port, "protocol": "http",
                                       "path": "/prefix", "geolocate": True, "verbose": True}}
    tricky = "~~~>>>???"
    plan = {"clients": {"n": client, "g": geo}, "steps": [
        {"client": "n", "method": "track", "args": ["Signed Up", {
            "distinct_id": "u2", "when": {"$date": ms}, "s": tricky}]},
        {"client": "n", "method": "track", "args": ["Dated", {
            "distinct_id": "u2", "time": {"$date": ms - 1000}}]},
        {"client": "n", "method": "track_batch", "args": [[
            {"event": "B%d" % i, "properties": {"distinct_id": "u2", "s": tricky * (i + 1),
                                                "time": ms - i}} for i in range(3)]]},
        {"client": "n", "method": "people.set", "args": ["u2", {"plan": "gold", "s": tricky}]},
        {"client": "n", "method": "people.union", "args": ["u2", {"tags": ["a", "b"]}]},
        {"client": "n", "method": "groups.set", "args": ["company", "acme", {"tier": 2}]},
        {"client": "n", "method": "import", "args": ["Old Node", {"$date": ms - 20 * 86400000},
                                                      {"distinct_id": "u2",
                                                       "$insert_id": "imp-node-1"}]},
        {"client": "n", "method": "import_batch", "args": [[
            {"event": "OldB", "properties": {"distinct_id": "u2", "time": ms - 10 * 86400000,
                                             "$insert_id": "imp-node-b%d" % i}}
            for i in range(2)]]},
        {"client": "g", "method": "track", "args": ["Geo", {"distinct_id": "u3"}]},
    ]}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(plan, fh)
    try:
        out = subprocess.run(["node", os.path.join(ROOT, "tests/js/node_sdk.js"), fh.name],
                             capture_output=True, text=True, timeout=60,
                             env=dict(os.environ, HTTP_PROXY="", HTTPS_PROXY="",
                                      http_proxy="", https_proxy=""))
    finally:
        os.unlink(fh.name)
    results = json.loads(out.stdout)["results"]
    failed = [r for r in results if r["error"]]
    if failed:
        raise SystemExit("node steps failed: %s\n%s" % (failed, out.stderr))
    return "node mixpanel 0.24.0"


# ---- the expected outcome, from the contract ---------------------------------------------

def params_of(req):
    params = dict(parse_qsl(req["query"], keep_blank_values=True))
    body = req["body"].decode("utf-8")
    ctype = req["headers"].get("Content-Type", "")
    if body and not ctype.startswith("application/json"):
        # Node's body is not percent-encoded; parse_qsl would turn its '+' into spaces,
        # so read the raw base64 for `data` first.
        raw = dict(p.partition("=")[::2] for p in body.split("&"))
        parsed = dict(parse_qsl(body, keep_blank_values=True))
        if "data" in raw and not raw["data"].lstrip().startswith(("{", "[", "%7B", "%5B")):
            parsed["data"] = raw["data"].replace("%2B", "+").replace("%2F", "/") \
                .replace("%3D", "=")
        params.update(parsed)
    return params


def records_of(data):
    text = data.strip()
    if not text.startswith(("{", "[")):
        text = base64.b64decode(text.replace(" ", "+") + "=" * (-len(text) % 4)).decode()
    value = json.loads(text)
    return value if isinstance(value, list) else [value]


def expected(endpoint, params, clock, remote):
    ip = remote if params.get("ip") == "1" else None
    items = []
    for rec in records_of(params["data"]):
        if endpoint in ("track", "import"):
            props = rec["properties"]
            t = props.get("time")
            if t is None:
                props["time"] = round(clock, 3)
            elif t > 1e11:
                props["time"] = t / 1000.0
            props["mp_processing_time_ms"] = int(clock * 1000)
            if ip is not None and "ip" not in props:
                props["ip"] = ip
        elif ip is not None and "$ip" not in rec:
            rec["$ip"] = ip
        items.append([QUEUES[endpoint], json.dumps(rec, separators=(",", ":"),
                                                   ensure_ascii=False)])
    verbose = params.get("verbose") == "1"
    body = '{"status": 1, "error": null}' if verbose else "1"
    ctype = "application/json" if verbose else "text/plain; charset=utf-8"
    return {"status": 200, "content_type": ctype, "body": body}, items


def case_of(req, source, clock):
    endpoint = req["path"].rstrip("/").rsplit("/", 1)[-1]
    remote = "203.0.113.7"
    response, items = expected(endpoint, params_of(req), clock, remote)
    body = req["body"]
    try:
        body_field = {"body": body.decode("utf-8")}
    except UnicodeDecodeError:
        body_field = {"body_base64": base64.b64encode(body).decode()}
    return {"name": "%s %s %s" % (source, req["method"], req["path"]),
            "source": source + " (recorded by record_sdks.py)",
            "clock": clock, "routes": ROUTES, "remote": remote,
            "request": dict({"method": req["method"], "path": req["path"],
                             "query": req["query"], "headers": req["headers"]}, **body_field),
            "response": response, "items": items}


def main():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Capture)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        for label, run in (("py", lambda: run_python("http://127.0.0.1:%d" % port)),
                           ("node", lambda: run_node(port))):
            Capture.seen = []
            source = run()
            clock = round(time.time() + 1.0, 3)
            for i, req in enumerate(Capture.seen):
                case = case_of(req, source, clock)
                name = "%s_%02d_%s.json" % (label, i, req["path"].strip("/").replace("/", "_"))
                with open(os.path.join(HERE, name), "w", encoding="utf-8") as fh:
                    json.dump(case, fh, indent=1, ensure_ascii=False)
                    fh.write("\n")
                print("wrote", name)
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    sys.exit(main())
