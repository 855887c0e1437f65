"""Read an access-log capture into entries, choose which to replay, and build the bytes.

    entries, skipped = load_log(path)
    kept, dropped = select(entries)                  # ingestion paths, not recorded 401s
    offsets = schedule(kept, speed=1.0)              # recorded pace (--order recorded)

Two formats are read, line by line, and can be mixed: the JSON lines deploy/nginx.conf
writes (`ingest_access`: only its captured lines carry the query string and body, the
others are skipped) and nginx's default `combined` format (no bodies, so only its GETs).
JSON lines may carry more fields than today's format: a request's `msec` (sub-second time), `http_x_forwarded_for` and `content_encoding` are
used when present, anything else is ignored; a POST logged without a `body` field at
all (capture off) cannot be replayed and is dropped.

This module only reads files and builds bytes; it never opens a socket.
"""
import collections
import datetime
import json
import re
import urllib.parse

from ingest.http.request import endpoint_of

# One log line, as the replay needs it.  `status` is the recorded answer (None if the
# line has none), `time` the recorded epoch seconds (None if unknown), `encoding` the
# body's Content-Encoding ("" when none was logged), `forwarded` the X-Forwarded-For the
# client sent ("" when not logged).  uri, content_type and body are bytes exactly as
# logged; body is None when the line logged no body at all.
Entry = collections.namedtuple(
    "Entry", "method uri content_type body client status time encoding forwarded")

_COMBINED = re.compile(
    r'^(?P<addr>\S+) \S+ \S+ \[(?P<time>[^\]]*)\] "(?P<method>[A-Z]+) (?P<uri>\S+) '
    r'HTTP/[0-9.]+" (?P<status>\d{3}) ')
_HEX_ESCAPE = re.compile(r"\\x([0-9A-Fa-f]{2})")
GZIP_MAGIC = b"\x1f\x8b"
DEFAULT_SKIP_STATUS = (401,)


def _bytes(text):
    # Lines are decoded with surrogateescape, so raw bytes >= 0x80 that nginx passed
    # through unescaped come back out exactly as they were sent.
    return text.encode("utf-8", "surrogateescape")


def _field(rec, *names):
    """The first of `names` logged with a value; nginx logs an unset variable as "" with
    escape=json and "-" otherwise."""
    for name in names:
        value = rec.get(name)
        if value not in (None, "", "-"):
            return value
    return None


def _iso_time(text):
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except (TypeError, ValueError):
        return None


def parse_json_line(text):
    """One JSON log line -> Entry, or None if it is not one."""
    try:
        rec = json.loads(text)
    except ValueError:
        return None
    if not isinstance(rec, dict) or not rec.get("method") or not rec.get("uri"):
        return None
    stamp = _field(rec, "msec")
    try:
        stamp = float(stamp) if stamp is not None else _iso_time(_field(rec, "time"))
    except ValueError:
        stamp = None
    status = rec.get("status")
    body = rec.get("body", rec.get("request_body"))
    return Entry(rec["method"], _bytes(rec["uri"]), _bytes(_field(rec, "content_type") or ""),
                 None if body is None else _bytes("" if body == "-" else body),
                 str(rec.get("remote_addr") or ""),
                 status if isinstance(status, int) else None, stamp,
                 (_field(rec, "content_encoding", "http_content_encoding") or "").lower(),
                 _field(rec, "http_x_forwarded_for", "x_forwarded_for") or "")


def parse_combined_line(text):
    """One nginx "combined" line -> Entry for GET requests, else None."""
    m = _COMBINED.match(text)
    if not m or m.group("method") != "GET":
        return None
    # nginx's default escaping writes bytes < 32 and > 126 and '"' as \xXX.
    uri = _HEX_ESCAPE.sub(lambda h: chr(int(h.group(1), 16)), m.group("uri"))
    try:
        stamp = datetime.datetime.strptime(m.group("time"), "%d/%b/%Y:%H:%M:%S %z").timestamp()
    except ValueError:
        stamp = None
    return Entry("GET", uri.encode("latin-1", "replace"), b"", b"", m.group("addr"),
                 int(m.group("status")), stamp, "", "")


def load_log(path):
    """Read the whole log once; returns (entries, count of lines that are not requests)."""
    entries, skipped = [], 0
    with open(path, "rb") as fh:
        for raw in fh:
            text = raw.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
            if not text.strip():
                continue
            parse = parse_json_line if text.lstrip().startswith("{") else parse_combined_line
            entry = parse(text)
            if entry is None:
                skipped += 1
            else:
                entries.append(entry)
    return entries, skipped


# ==== which entries to replay =============================================================

def path_of(entry):
    return urllib.parse.unquote_to_bytes(entry.uri.partition(b"?")[0]).decode("latin-1")


def select(entries, all_paths=False, skip_status=DEFAULT_SKIP_STATUS):
    """The entries to replay, in log order, and {why dropped: count}.

    By default only the ingestion endpoints (/track /engage /groups /import, under any
    prefix) are kept: a capture also holds /ready probes, /metrics scrapes and stray
    paths, which are not load.  Entries recorded with a status in `skip_status` (401:
    the log holds no credentials, so they cannot be replayed as they were) and POSTs
    logged without a body are dropped too.
    """
    kept, dropped = [], collections.Counter()
    for e in entries:
        if not all_paths and endpoint_of(path_of(e)) is None:
            dropped["not an ingestion path"] += 1
        elif e.status is not None and e.status in skip_status:
            dropped["recorded status %d" % e.status] += 1
        elif e.body is None and e.method in ("POST", "PUT"):
            dropped["POST logged without its body"] += 1
        else:
            kept.append(e)
    return kept, dict(dropped)


# ==== recorded pace ======================================================================

def schedule(entries, speed):
    """Send times (seconds from the start) that keep the recorded gaps, divided by
    `speed`; None for speed 0 (as fast as possible).

    nginx's $time_iso8601 has one-second resolution: entries stamped with the same
    second are spread evenly over that second, in log order.  Entries without a time
    take the previous one's.  Times never go backwards (a log merged from several
    machines may): an earlier stamp is sent with the one before it.
    """
    if not speed:
        return None
    times, last = [], None
    for e in entries:
        t = e.time if e.time is not None else last
        last = t if t is not None and (last is None or t >= last) else last
        times.append(last if last is not None else 0.0)
    coarse = all(float(t).is_integer() for t in times)
    out = []
    i = 0
    while i < len(times):
        j = i
        while j < len(times) and times[j] == times[i]:
            j += 1
        for k in range(i, j):
            out.append(times[i] + ((k - i) / (j - i) if coarse else 0.0))
        i = j
    start = out[0] if out else 0.0
    return [(t - start) / speed for t in out]


# ==== the bytes of one request ===========================================================

def build_request(entry, host_header, prefix=b"", authorization=None):
    """The exact bytes of one HTTP/1.1 request, built once so replay only calls sendall."""
    method, uri, content_type, body = entry.method, entry.uri, entry.content_type, entry.body
    body = body or b""
    lines = [b"%s %s%s HTTP/1.1" % (method.encode("ascii"), prefix, uri),
             b"Host: " + host_header, b"User-Agent: ingest-bench/1", b"Accept: */*"]
    client = entry.client
    if client:
        # In production nginx adds this (after what the client sent, if anything); the
        # worker trusts it from loopback.
        forwarded = "%s, %s" % (entry.forwarded, client) if entry.forwarded else client
        lines.append(b"X-Forwarded-For: " + forwarded.encode("ascii", "replace"))
    if content_type:
        lines.append(b"Content-Type: " + content_type)
    encoding = entry.encoding or ("gzip" if body[:2] == GZIP_MAGIC else "")
    if encoding and body:
        lines.append(b"Content-Encoding: " + encoding.encode("ascii", "replace"))
    if authorization and endpoint_of(path_of(entry)) == "import":
        lines.append(b"Authorization: " + authorization)
    if body or method in ("POST", "PUT"):
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def split_url(url):
    """http://host:port[/prefix] -> (host header bytes, prefix bytes)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError("--url must be http://host:port[/prefix], not %r" % url)
    return parts.netloc.encode("ascii"), parts.path.rstrip("/").encode("ascii")
