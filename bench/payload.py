"""The records an access-log entry carries, and the same request with changed records.

    p = Payload(entry)
    p.records                     # the decoded `data` records, or None (undecodable/none)
    p.rebuild(new_records)        # the entry again, `data` re-encoded as it was sent
    shift_entries(entries, now)   # every record's time moved: the newest lands at `now`
    with_verbose(entry)           # the same request asking for verbose answers

`data` is found where the worker looks for it (ingest/decode.py): a form body (the body
wins), else the query string, or a JSON / NDJSON body that is the data itself; bodies
may be gzip.  Re-encoding keeps how it was sent: base64 (standard or URL-safe, padded or
not) or raw JSON (compact or spaced, \\u-escaped or UTF-8), percent-encoding style
(encodeURIComponent, form `+` for spaces, or raw as the Node SDK posts base64), the
other parameters byte for byte, and gzip.  A style it cannot recognise falls back to
percent-encoded compact JSON, which the worker reads the same way.

This module only transforms values; it never opens a socket or a file.
"""
import base64
import binascii
import gzip
import json
import struct
import urllib.parse
import zlib

from bench.capture import GZIP_MAGIC, path_of
from ingest.clean import MS_THRESHOLD
from ingest.decode import FORM_TYPES, JSON_TYPES, NDJSON_TYPES, parse_pairs
from ingest.http.request import TRUE, endpoint_of

_JSON_STYLES = ((False, (",", ":")), (True, (",", ":")), (False, (", ", ": ")),
                (True, (", ", ": ")))
# In order of preference when several reproduce what was logged (a value without any
# character to escape reads the same under all of them).
_QUOTES = (("component", lambda s: urllib.parse.quote(s, safe="!~*'()")),  # encodeURIComponent
           ("strict", lambda s: urllib.parse.quote(s, safe="")),
           ("form", lambda s: urllib.parse.quote_plus(s, safe="")),         # urlencode()
           ("raw", lambda s: s))                                             # Node's bodies
_QUOTE = dict(_QUOTES)
_URLSAFE = str.maketrans("-_", "+/")
_TO_URLSAFE = str.maketrans("+/", "-_")


def _unquote(raw):
    return urllib.parse.unquote_plus(raw) if ("%" in raw or "+" in raw) else raw


def _span(text, name):
    """(start, end) of the value of the last `name=` pair (last one wins), or None."""
    found, pos = None, 0
    for part in text.split("&"):
        if part.partition("=")[0] == name and "=" in part:
            found = (pos + len(name) + 1, pos + len(part))
        pos += len(part) + 1
    return found


class Payload:
    """Where an entry's `data` is, how it was encoded, and its records."""

    def __init__(self, entry):
        self.entry = entry
        self.records = None
        self.where = None           # "form", "query", "json" or "ndjson"
        self.gzip = False
        self.text = ""              # the form body, query string or JSON body, decoded
        self.form = None            # a form body's text, decoded (its parameters win)
        self.span = None            # where the data value sits in `text`
        self.b64 = None             # (urlsafe, padded) when data was base64
        self.single = False         # data was one object rather than an array
        self._sent = None           # (JSON text, value as sent, raw) for the styles
        self.newline = "\n"
        try:
            self._locate()
            if self.where is not None:
                self._decode()
        except (ValueError, UnicodeError, binascii.Error, zlib.error, EOFError, OSError,
                RecursionError):
            self.records = None

    def _locate(self):
        entry, body = self.entry, self.entry.body or b""
        if body and (entry.encoding in ("gzip", "x-gzip") or body[:2] == GZIP_MAGIC):
            body, self.gzip = gzip.decompress(body), True
        media = entry.content_type.decode("latin-1").split(";", 1)[0].strip().lower()
        if body and media in JSON_TYPES + NDJSON_TYPES:
            self.where = "json" if media in JSON_TYPES else "ndjson"
            self.text = body.decode("utf-8")
            return
        if body and (media in FORM_TYPES or media.startswith("text/")):
            self.form = self.text = body.decode("utf-8")
            self.span = _span(self.text, "data")
            if self.span is not None:
                self.where = "form"
                return
        query = entry.uri.partition(b"?")[2].decode("latin-1")
        self.span = _span(query, "data")
        if self.span is not None:
            self.where, self.text = "query", query

    def _decode(self):
        if self.where == "ndjson":
            lines = [line for line in self.text.splitlines() if line.strip()]
            self.newline = "\r\n" if "\r\n" in self.text else "\n"
            self.records = [json.loads(line) for line in lines]
            self._sent = (lines[0] if lines else "", None, None)
            return
        raw = self.text if self.where == "json" else self.text[self.span[0]:self.span[1]]
        value = raw if self.where == "json" else _unquote(raw)
        stripped = value.strip()
        if stripped[:1] in ("{", "["):
            as_sent, text = value, value
        else:
            as_sent = stripped.replace(" ", "+")       # the Node SDK's unescaped '+'
            # Unpadded only when visibly so: an SDK's base64 is padded.
            self.b64 = ("-" in as_sent or "_" in as_sent,
                        as_sent.endswith("=") or len(as_sent) % 4 == 0)
            padded = as_sent.translate(_URLSAFE).rstrip("=")
            text = base64.b64decode(padded + "=" * (-len(padded) % 4),
                                    validate=True).decode("utf-8")
        obj = json.loads(text)
        if isinstance(obj, dict):
            self.records, self.single = [obj], True
        elif isinstance(obj, list):
            self.records = obj
        else:
            return
        self._sent = (text.strip(), as_sent, raw)

    def _styles(self):
        """(JSON style, percent-encoding style) that reproduce what was logged; looked
        for only when rebuilding, since most entries are only counted."""
        text, as_sent, raw = self._sent
        sample = self.records[0] if self.where == "ndjson" or self.single else self.records
        style = next((st for st in _JSON_STYLES if _dumps(sample, st) == text),
                     _JSON_STYLES[0])
        quote = next((name for name, f in _QUOTES if as_sent is not None and f(as_sent) == raw),
                     "component")
        return style, quote

    def rebuild(self, records):
        """The entry with `records` in place of its data, encoded the way it was sent."""
        style, quote = self._styles()
        if self.where == "ndjson":
            text = self.newline.join(_dumps(r, style) for r in records)
            return self._with_text(text + (self.newline if self.text.endswith("\n") else ""))
        value = _dumps(records[0] if self.single else records, style)
        if self.b64 is not None:
            urlsafe, padded = self.b64
            value = base64.b64encode(value.encode("utf-8")).decode("ascii")
            value = value.translate(_TO_URLSAFE) if urlsafe else value
            value = value if padded else value.rstrip("=")
        if self.where == "json":
            return self._with_text(value)
        if self.where == "query" and quote == "raw" and not value.isascii():
            quote = "component"
        start, end = self.span
        return self._with_text(self.text[:start] + _QUOTE[quote](value) + self.text[end:])

    def _with_text(self, text):
        if self.where == "query":
            path = self.entry.uri.partition(b"?")[0]
            return self.entry._replace(uri=path + b"?" + text.encode("latin-1", "replace"))
        body = text.encode("utf-8")
        return self.entry._replace(body=_gzip_like(self.entry.body, body) if self.gzip else body)


def _gzip_like(original, data):
    """`data` gzipped as `original` was: its header (time stamp, OS) and, from the
    header's XFL, its compression level; a header with optional fields is not copied."""
    if len(original) < 10 or original[3] != 0:
        return gzip.compress(data, mtime=0)
    level = {2: 9, 4: 1}.get(original[8], 6)
    deflate = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
    return (original[:10] + deflate.compress(data) + deflate.flush()
            + struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF))


def _dumps(value, style):
    ensure_ascii, separators = style
    return json.dumps(value, ensure_ascii=ensure_ascii, separators=separators)


# ==== record times ======================================================================

def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _time_slots(record):
    """(container, key) of each time a record carries: properties.time, $time."""
    if not isinstance(record, dict):
        return []
    slots = []
    props = record.get("properties")
    if isinstance(props, dict) and _number(props.get("time")):
        slots.append((props, "time"))
    if _number(record.get("$time")):
        slots.append((record, "$time"))
    return slots


def _seconds(t):
    return t / 1000.0 if t > MS_THRESHOLD else t


def _decimals(t):
    text = repr(t)
    return len(text.partition(".")[2]) if "." in text and "e" not in text else 0


def shifted(t, delta_ms):
    """`t` (seconds, or milliseconds above MS_THRESHOLD) moved by delta_ms, same unit and
    type; floats keep their precision (at least milliseconds)."""
    if t > MS_THRESHOLD:
        return t + delta_ms if isinstance(t, int) else round(t + delta_ms, _decimals(t))
    if isinstance(t, int):
        return t + round(delta_ms / 1000.0)
    return round(t + delta_ms / 1000.0, max(3, _decimals(t)))


def newest_time(payloads):
    """The latest record time (seconds) over all payloads, or None."""
    times = [_seconds(c[k]) for p in payloads if p.records
             for r in p.records for c, k in _time_slots(r)]
    return max(times) if times else None


def shift_entries(entries, now):
    """(entries with every record time moved so the newest lands at `now` and the gaps
    stay, the shift in seconds).  Entries without times are returned unchanged."""
    payloads = [Payload(e) for e in entries]
    newest = newest_time(payloads)
    if newest is None:
        return list(entries), 0.0
    delta_ms = round((now - newest) * 1000)
    out = []
    for entry, p in zip(entries, payloads):
        if not p.records or not any(_time_slots(r) for r in p.records):
            out.append(entry)
            continue
        records = json.loads(json.dumps(p.records))     # a deep copy
        for record in records:
            for container, key in _time_slots(record):
                container[key] = shifted(container[key], delta_ms)
        out.append(p.rebuild(records))
    return out, delta_ms / 1000.0


# ==== answers the replay can read ===========================================================

def _params(entry, p):
    params = parse_pairs(entry.uri.partition(b"?")[2].decode("latin-1"), {})
    if p.form is not None:
        parse_pairs(p.form, params)
    return params


def is_strict(entry, p=None):
    """/import with strict=1: the answer is JSON that counts every record."""
    if endpoint_of(path_of(entry)) != "import":
        return False
    return _params(entry, p or Payload(entry)).get("strict") in TRUE


def with_verbose(entry):
    """The same request asking for verbose answers (`verbose=1` where the worker reads
    it: a form body's own `verbose` wins over the query string's)."""
    p = Payload(entry)
    span = _span(p.form, "verbose") if p.form is not None else None
    if span is not None:
        body = (p.form[:span[0]] + "1" + p.form[span[1]:]).encode("utf-8")
        return entry._replace(body=_gzip_like(entry.body, body) if p.gzip else body)
    path, sep, query = entry.uri.partition(b"?")
    text = query.decode("latin-1")
    span = _span(text, "verbose")
    if span is not None:
        text = text[:span[0]] + "1" + text[span[1]:]
    else:
        text = text + "&verbose=1" if text else "verbose=1"
    return entry._replace(uri=path + b"?" + text.encode("latin-1"))
