"""Request -> parameters -> raw records.  Pure: no sockets, no eventlet, no globals.

What the SDKs send (docs/http-api.md): `data` in the query string or
in a form body (application/x-www-form-urlencoded, or text/plain from sendBeacon), as raw
JSON or base64 of UTF-8 JSON (standard or URL-safe alphabet, padded or not), one object or
an array.  The Node SDK posts base64 without percent-encoding, so its `+` arrives as a
space after form decoding: spaces are turned back into `+` only on the base64 path, never
inside raw JSON.  Every failure raises IngestError with a stable reason.
"""
import binascii
import codecs
import re
from urllib.parse import unquote_plus

import msgspec
import pybase64
import simplejson

from ingest.errors import IngestError

# Parameters whose value the app looks at; anything else in the query or body is ignored.
CONTROL_PARAMS = frozenset(("data", "ip", "verbose", "callback", "img", "redirect", "test",
                            "strict", "api_key", "project_id"))
FORM_TYPES = ("", "application/x-www-form-urlencoded", "text/plain")
JSON_TYPES = ("application/json",)
NDJSON_TYPES = ("application/x-ndjson", "application/jsonl")
_URLSAFE = bytes.maketrans(b"-_ ", b"+/+")
_FIRST_CHAR = re.compile(r"\s*(\S)")
# What str.strip() and \s take for white space among ASCII characters, for ASCII bytes.
_ASCII_SPACE = bytes(c for c in range(128) if chr(c).isspace())
_FIRST_BYTE = re.compile(b"[%s]*([^%s])" % (re.escape(_ASCII_SPACE), re.escape(_ASCII_SPACE)))
_NDJSON_LINE_END = re.compile("[\n\r\x0b\x0c\x1c\x1d\x1e]")


def parse_pairs(text, into):
    """Add the known parameters of a urlencoded string to dict `into` (last one wins)."""
    # PERF: pairs are found with find(), which skips to the next `&` at memchr speed;
    # split("&") walks a 15 KB `data=` body a character at a time (5% of a batch
    # request's in-process instructions), and the usual body is that one pair.
    start = 0
    while True:
        end = text.find("&", start)
        part = text[start:] if end < 0 else text[start:end]
        name, sep, value = part.partition("=")
        if name in CONTROL_PARAMS:
            # PERF: only known names are unquoted; cache busters like `_=` are skipped.
            into[name] = unquote_form(value) if ("%" in value or "+" in value) else value
        if end < 0:
            return into
        start = end + 1


def parse_ascii_pairs(body, into):
    """parse_pairs of an ASCII form body (bytes): the same parameters, but `data` kept
    in bytes where it reads the same (see _form_data).

    PERF: parse_pairs' own loop, for bytes: one loop taking either type cost a
    single-event GET 1,600 more instructions (bench.instructions --shapes single)."""
    start = 0
    while True:
        end = body.find(b"&", start)
        part = body[start:] if end < 0 else body[start:end]
        name, _, value = part.partition(b"=")
        key = _ASCII_NAMES.get(name)
        if key == "data":
            into[key] = _form_data(value)
        elif key is not None:
            value = value.decode("ascii")
            into[key] = unquote_form(value) if ("%" in value or "+" in value) else value
        if end < 0:
            return into
        start = end + 1


_ASCII_NAMES = {name.encode("ascii"): name for name in CONTROL_PARAMS}


# The two characters after `%` of every escape (hex digits in either case) -> its byte.
_HEX_DIGITS = "0123456789abcdefABCDEF"
_ESCAPES = {(a + b).encode(): bytes((int(a + b, 16),)) for a in _HEX_DIGITS for b in _HEX_DIGITS}
# A value with more escapes than this is unescaped by codecs.escape_decode instead.
_FEW_ESCAPES = 32


def unquote_form(value):
    """urllib's unquote_plus, at C speed for ASCII values.

    PERF: unquote_plus handles each %XX escape in Python: 123 us for six events of raw
    JSON as the Python SDK form-encodes them (522 escapes), 14 us this way.  A value
    with few escapes (base64, whose only escapes are the `+`, `/` and `=` that are
    rare in the base64 of ASCII JSON) is unescaped between the escapes found by
    find(), which skips at memchr speed; one with more than _FEW_ESCAPES goes whole
    through codecs.escape_decode (`%` becomes `\\x`, literal backslashes doubled
    first), which reads every byte.  A value escape_decode refuses (an escape that is
    not two hex digits) or that is not ASCII goes to urllib, so every value reads as
    before (tests/unit/test_fast_paths.py).  The replacing is done on bytes: on a 15 KB
    base64 value with a single `%`, str.replace took 6-10 us and bytes.replace 0.5 us;
    on escape-heavy values (naked JSON) the two are about even.  Over the mixed SDK log
    the str replaces were 9 % of the app's instructions (bench.instructions --shapes
    mixed)."""
    if not value.isascii():
        return unquote_plus(value)
    raw = _unquote_ascii(value.encode("ascii"))
    return unquote_plus(value) if raw is None else raw.decode("utf-8", "replace")


def _unquote_ascii(value):
    """unquote_form's bytes of an ASCII value (bytes), or None when escape_decode
    refuses it (urllib decides)."""
    raw = value.replace(b"+", b" ")
    pos = raw.find(b"%")
    pieces, start = [], 0
    escapes = _ESCAPES
    for _ in range(_FEW_ESCAPES):
        if pos < 0:
            pieces.append(raw[start:])
            return b"".join(pieces)
        pieces.append(raw[start:pos])
        byte = escapes.get(raw[pos + 1:pos + 3])
        if byte is None:          # not an escape: the `%` stays, as urllib leaves it
            pieces.append(b"%")
            start = pos + 1
        else:
            pieces.append(byte)
            start = pos + 3
        pos = raw.find(b"%", start)
    raw = raw.replace(b"\\", b"\\\\").replace(b"%", b"\\x")
    try:
        return codecs.escape_decode(raw)[0]
    except ValueError:
        return None


def _form_data(value):
    """The `data` value of an ASCII form body (bytes), unquoted: as bytes when it reads
    as ASCII (decode_records reads those as it reads the same str), else as str.

    PERF: a 50-event batch's body was decoded to str (15 KB), its value encoded back to
    bytes for base64 (15 KB more), and an unquoted value decoded to str: copies, and
    for the decodes a check of every byte."""
    if value.find(b"%") < 0 and value.find(b"+") < 0:
        return value
    raw = _unquote_ascii(value)
    if raw is None:
        return unquote_plus(value.decode("ascii"))
    return raw if raw.isascii() else raw.decode("utf-8", "replace")


def read_params(query_string, content_type, body):
    """Merge query-string and body parameters; body fields win (Python posts `verbose` there).

    A JSON body (application/json) is taken as the `data` value itself.
    """
    params = {}
    if query_string:
        parse_pairs(query_string, params)
    if body:
        media = content_type.split(";", 1)[0].strip().lower()
        if media in JSON_TYPES:
            # An ASCII body is read as the same text (see decode_records).
            params["data"] = body if body.isascii() else _text(body)
        elif media in NDJSON_TYPES:
            # One record per line (/import's bulk format) becomes one JSON array.  Lines
            # end where str.splitlines() ends them, except at U+0085, U+2028 and U+2029:
            # JSON strings may hold those raw, never the control characters.
            lines = [line for line in _NDJSON_LINE_END.split(_text(body)) if line.strip()]
            params["data"] = "[" + ",".join(lines) + "]"
        elif media in FORM_TYPES or media.startswith("text/"):
            if body.isascii():
                parse_ascii_pairs(body, params)
            else:
                parse_pairs(_text(body), params)
        else:
            raise IngestError("unsupported_content_type")
    return params


def _text(body):
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise IngestError("invalid_utf8", "body") from None


def _no_constants(name):
    raise ValueError("%s is not valid JSON" % name)


# PERF: one decoder built once; simplejson.loads(parse_constant=...) builds a new one per
# call (about 2 us each in the profile of a single-event GET).
_DECODER = simplejson.JSONDecoder(parse_constant=_no_constants)


def _plain_float(text):
    """A float literal msgspec met, parsed as simplejson parses it (float()); refused when
    Python would write it back with an exponent (below 1e-4, from 1e16, infinite), so
    that a record msgspec decoded contains only floats that msgspec writes exactly as
    the standard library does (ingest/encode.py)."""
    value = float(text)
    if 1e-4 <= value < 1e16 or -1e16 < value <= -1e-4 or value == 0.0:
        return value
    raise ValueError("float written with an exponent")


# PERF: msgspec parses a typical event in ~0.6 us against simplejson's ~1.6 us.  It is a
# fast path only: it refuses everything simplejson refuses (NaN, Infinity, trailing
# garbage, control characters, >4,300-digit integers) and more (lone surrogates, a BOM,
# very deep nesting, the floats _plain_float refuses), and where it accepts a text it
# builds the same values (tests/unit/test_fast_paths.py compares both on generated and
# hostile texts).  Whatever it refuses, simplejson decides, so errors and the values of
# the texts only simplejson accepts are exactly what they were.
_FAST_DECODER = msgspec.json.Decoder(float_hook=_plain_float)


def loads_checked(text):
    """(value, plain): plain is True when the fast path decoded it (every float in it
    is written without an exponent, none is infinite: encode's fast path is exact)."""
    try:
        return _FAST_DECODER.decode(text), True
    except Exception:
        return strict_loads(text), False


def loads(text):
    """simplejson, strictly: NaN/Infinity refused, enormous numbers and deep nesting caught."""
    return loads_checked(text)[0]


def strict_loads(text):
    """The reference decoder: simplejson with NaN/Infinity refused."""
    try:
        return _DECODER.decode(text)
    except RecursionError:
        raise IngestError("too_deep") from None
    except (ValueError, TypeError):
        # JSONDecodeError is a ValueError; so is int() refusing a 5,000-digit number.
        raise IngestError("invalid_json") from None


def b64decode(value):
    """Standard or URL-safe base64, padded or not, with spaces read as `+` (Node's bodies).

    `value`: str, or ASCII bytes read as the same str."""
    if type(value) is str:
        raw = value.strip().encode("ascii", "replace")
    else:
        raw = value.strip(_ASCII_SPACE)
    # PERF: each step copies the value (14 KB for a 50-event batch); skip the ones that
    # would change nothing: no URL-safe or space characters, padding already right.
    # PERF: find(), not `in`: bytes.__contains__ first tries its argument as an integer,
    # raising and clearing a TypeError each time (4,300 instructions for these three).
    if raw.find(b"-") >= 0 or raw.find(b"_") >= 0 or raw.find(b" ") >= 0:
        raw = raw.translate(_URLSAFE)
    if raw[-1:] == b"=" or len(raw) % 4:
        raw = raw.rstrip(b"=")
        raw += b"=" * (-len(raw) % 4)
    # PERF: pybase64 (SIMD) decodes a 50-event batch's 15 KB in ~2 us against ~35 us for
    # binascii, which was 7% of a batch worker's CPU.  It is a fast path only: it refuses
    # at least what binascii's strict mode refuses (tests/unit/test_fast_paths.py), and
    # whatever it refuses binascii decides, so every error stays binascii's.
    try:
        return pybase64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        pass
    try:
        return binascii.a2b_base64(raw, strict_mode=True)
    except (binascii.Error, ValueError):
        raise IngestError("invalid_base64") from None


def decode_data(value):
    """The `data` parameter -> list of raw records (whatever JSON values they are)."""
    return decode_records(value)[0]


# A text whose records may be nested this deep is decoded by simplejson alone: near the
# interpreter's recursion limit msgspec reads a few levels deeper than simplejson, and a
# request refused whole as too_deep must stay refused (no record is legitimately this
# deep: max_depth refuses far less).
_MAYBE_TOO_DEEP = 400


def nesting_bound(records, brackets):
    """How deep any record of `records` can be nested, from the number of `{` and `[`
    in the request's JSON text (`brackets`; brackets inside strings only add).

    A record nested N levels below its properties holds N + 2 brackets; every other
    record that is an object with an object `properties` holds at least 2, and the rest
    at least 0.  So no record can be nested deeper than the brackets left once 2 are
    counted for each of those (clean.Context.values_checked uses the same bound)."""
    shaped = 0
    for record in records:
        if type(record) is dict and type(record.get("properties")) is dict:
            shaped += 1
    return brackets - 2 * shaped


def _utf8(data):
    """`data` as a str: a str as it is, bytes read as UTF-8 (or invalid_utf8)."""
    if type(data) is str:
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise IngestError("invalid_utf8") from None


def _square_brackets(text):
    """How many `[` `text` (bytes or str) holds.

    PERF: a batch usually holds one, the outer array's; count() reads every byte (7 %
    of a 50-event batch's instructions for both brackets) where find() (memchr) skips
    to the next one, so the count runs only when there is a second."""
    bracket = b"[" if type(text) is bytes else "["
    first = text.find(bracket)
    if first < 0:
        return 0
    if text.find(bracket, first + 1) < 0:
        return 1
    return text.count(bracket)


def decode_records(value):
    """The `data` parameter -> (list of raw records, plain: see loads_checked, brackets).

    `value`: str, or ASCII bytes, read as the same str (read_params keeps an ASCII JSON
    body, and parse_ascii_pairs an ASCII form body's data, in bytes).  `brackets`: how
    many `{` and `[` the JSON text holds, counted at C speed."""
    if type(value) is bytes:
        first = _FIRST_BYTE.match(value)
        json_text = first is not None and first.group(1) in b"{["
    else:
        first = _FIRST_CHAR.match(value) if value is not None else None
        json_text = first is not None and first.group(1) in "{["
    if first is None:
        raise IngestError("missing_data")
    # PERF: a regex finds the first non-space character without copying a 10 MB value.
    source = value if json_text else b64decode(value)
    # PERF: msgspec reads bytes (an ASCII body's, or base64's UTF-8) themselves: decoding
    # base64's to a str first cost a copy, and msgspec then encoded a str that is not
    # ASCII back to UTF-8 (5 % of the mixed log's in-process instructions).  It refuses
    # every invalid UTF-8 sequence (inside strings; outside them any byte above 0x7f is a
    # syntax error), so a text it accepts is one the str path accepts alike; what it
    # refuses goes the str path, which decides the error (invalid_utf8 first, as before).
    try:
        parsed, plain = _FAST_DECODER.decode(source), True
    except Exception:
        parsed, plain = strict_loads(_utf8(source)), False
    # PERF: base64's counted in the bytes, 8.7 against 9.7 us for a 50-event batch; the
    # same count, as UTF-8 never uses an ASCII byte inside a multi-byte character.
    brackets = source.count(b"{" if type(source) is bytes else "{") + _square_brackets(source)
    if plain and brackets >= _MAYBE_TOO_DEEP and nesting_bound(
            parsed if isinstance(parsed, list) else [parsed], brackets) >= _MAYBE_TOO_DEEP:
        parsed, plain = strict_loads(_utf8(source)), False
    if isinstance(parsed, dict):
        parsed = [parsed]
    elif not isinstance(parsed, list):
        raise IngestError("invalid_data")
    return parsed, plain, brackets
