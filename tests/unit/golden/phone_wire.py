"""The phone SDKs' wire writers and answer readers, rebuilt in Python for the golden cases.

The phone SDKs (mixpanel-android 8.9.0, mixpanel-swift 6.5.1, mixpanel-iphone 5.0.9,
mixpanel-react-native 3.2.1 in JavaScript mode, mixpanel_flutter 2.12.0) cannot run on
these machines, so golden/write_phone_cases.py builds their request bytes with these
functions, each written from a reading of the SDK's source (named in its docstring):
its JSON writer (escaping and number formatting), its URL encoding and its gzip framing.
The readers say what each SDK does with an answer: delete the batch, keep it and retry
later, or (React Native) drop the batch's first record.

Used by the developer tool write_phone_cases.py and by test_golden.py; no I/O.
"""
import gzip
import json
import struct
import zlib
from decimal import Decimal

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
                        "-_.!~*'()")


class Raw:
    """A number written exactly as `text` (a form the SDK's writer produces that Python's
    float repr would not, e.g. Foundation's 17 significant digits)."""

    def __init__(self, text):
        self.text = text


def f32(value):
    """A Float (32-bit) widened to double, as Foundation writes an NSNumber float."""
    return Raw("%.17g" % struct.unpack("<f", struct.pack("<f", value))[0])


def _digits(x):
    """Shortest round-trip decimal digits of abs(x) and the exponent n such that
    abs(x) = 0.d1d2... x 10**n (the ECMAScript and Java formatting rules start here)."""
    _, digits, exp = Decimal(repr(abs(x))).normalize().as_tuple()
    return "".join(map(str, digits)), len(digits) + exp


def java_double(x):
    """java.lang.Double.toString: plain for 1e-3 <= |x| < 1e7, else d.dddE<n>."""
    if x == 0:
        return "-0.0" if str(x).startswith("-") else "0.0"
    sign = "-" if x < 0 else ""
    digits, n = _digits(x)
    if 1e-3 <= abs(x) < 1e7:
        whole = digits[:n] if n > 0 else "0"
        whole += "0" * max(0, n - len(digits))
        frac = digits[n:] if n > 0 else "0" * -n + digits
        return "%s%s.%s" % (sign, whole, frac or "0")
    return "%s%s.%sE%d" % (sign, digits[0], digits[1:] or "0", n - 1)


def js_number(x):
    """ECMAScript Number::toString (what JSON.stringify writes); integers above 2**53
    lose precision exactly as a JavaScript number does."""
    x = float(x)
    if x == 0:
        return "0"
    sign = "-" if x < 0 else ""
    digits, n = _digits(x)
    k = len(digits)
    if k <= n <= 21:
        return sign + digits + "0" * (n - k)
    if 0 < n <= 21:
        return sign + digits[:n] + "." + digits[n:]
    if -6 < n <= 0:
        return sign + "0." + "0" * -n + digits
    e = n - 1
    mant = digits[0] + ("." + digits[1:] if k > 1 else "")
    return "%s%se%s%d" % (sign, mant, "+" if e > 0 else "-", abs(e))


def _escape(text, slash, surrogates=False):
    """JSON string quoting: '"', '\\', the five short forms and other C0 controls
    always; '/' as \\/ when `slash`; lone surrogates as \\udxxx when `surrogates`."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in ('"', "\\") or (slash and ch == "/"):
            out.append("\\" + ch)
        elif ch in _SHORT:
            out.append(_SHORT[ch])
        elif code < 0x20 or (surrogates and 0xD800 <= code <= 0xDFFF):
            out.append("\\u%04x" % code)
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


_SHORT = {"\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _writer(string, number):
    def write(value):
        if isinstance(value, Raw):
            return value.text
        if value is None:
            return "null"
        if value is True or value is False:
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return number(value)
        if isinstance(value, str):
            return string(value)
        if isinstance(value, dict):
            return "{" + ",".join(string(k) + ":" + write(v) for k, v in value.items()) + "}"
        return "[" + ",".join(write(v) for v in value) + "]"
    return write


def _org_number(value):
    """org.json JSONObject.numberToString (Android's libcore copy): an integral value that
    fits a long is written as a long, anything else as Double.toString; -0.0 as "-0"."""
    if isinstance(value, int):
        return str(value)
    if value == 0 and str(value).startswith("-"):
        return "-0"
    if value == int(value) and -2 ** 63 <= value < 2 ** 63:
        return str(int(value))
    return java_double(value)


def _foundation_number(value):
    """NSJSONSerialization: integers and integral doubles without a decimal point,
    other doubles in their shortest form (older OS releases write 17 digits: use Raw)."""
    if isinstance(value, float) and value == int(value) and abs(value) < 2 ** 63:
        return str(int(value))
    return str(value) if isinstance(value, int) else repr(value)


# Android's org.json (libcore JSONStringer): escapes '"', '\\', '/' (as \/), the five
# short forms and other C0 controls as \u00xx; U+2028 and non-ASCII stay as they are.
org_json = _writer(lambda s: _escape(s, True), _org_number)
# Foundation's NSJSONSerialization (Swift's JSONSerialization, iPhone's MPJSONHandler):
# the same escaping, '/' included.
foundation_json = _writer(lambda s: _escape(s, True), _foundation_number)
# React Native's JSON.stringify (ES2019, well-formed): '/' and U+2028 as they are, a lone
# surrogate as \udxxx.
js_json = _writer(lambda s: _escape(s, False, True), js_number)


def java_utf8(text):
    """String.getBytes() on Android (UTF-8): a lone surrogate becomes '?'."""
    return "".join("?" if 0xD800 <= ord(ch) <= 0xDFFF else ch for ch in text).encode("utf-8")


def uri_component(text):
    """android.net.Uri.encode and JavaScript's encodeURIComponent: the same unreserved
    set (letters, digits, - _ . ! ~ * ' ( )); everything else as %XX of UTF-8."""
    return "".join(ch if ch in _UNRESERVED else "".join("%%%02X" % b for b in ch.encode("utf-8"))
                   for ch in text)


def java_gzip(data):
    """java.util.zip.GZIPOutputStream: a 10-byte header without name or time, raw deflate
    at the default level, CRC-32 and length little-endian."""
    deflater = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = deflater.compress(data) + deflater.flush()
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x00"
    return header + body + struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF)


def zlib_gzip(data):
    """zlib's deflateInit2 with MAX_WBITS + 16 and MAX_MEM_LEVEL (Swift's
    Data.gzipCompressed); zlib writes the operating-system byte of its build (19, Apple)."""
    deflater = zlib.compressobj(-1, zlib.DEFLATED, 31, 9, zlib.Z_DEFAULT_STRATEGY)
    out = bytearray(deflater.compress(data) + deflater.flush())
    out[9] = 19
    assert gzip.decompress(bytes(out)) == data
    return bytes(out)


# ---- how each SDK reads an answer: "delete" the batch, "retry" it later, or
# "drop_first" (remove the batch's first record, then send the rest) ---------------------

def read_android(status, body):
    """AnalyticsMessages.sendData + HttpService: any 2xx deletes the batch whatever the
    body; 5xx: three quick tries, then back-off (Retry-After seconds, at least
    2**n x 60 s, at most 10 min); any other status keeps the batch for the next flush."""
    return "delete" if 200 <= status < 300 else "retry"


def read_swift(status, body):
    """Network.apiRequest + FlushRequest: status 200 and a UTF-8 body delete the batch
    (Int(body) ?? 0; a 0 is only logged as "api rejected some items"); anything else keeps
    it, and the next flush waits Retry-After seconds (back-off from the second failure)."""
    if status != 200:
        return "retry"
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return "retry"
    return "delete"


def read_iphone(status, body):
    """MPNetwork: only a 5xx (or no answer) keeps the batch; every other status,
    4xx included, deletes it."""
    return "retry" if 500 <= status <= 599 else "delete"


def read_react_native(status, body):
    """mixpanel-network.js: response.json() runs before the status is looked at, so a
    body that is not JSON is a failure (retried with back-off, then kept); 200 deletes the
    batch, 400 drops its first record, any other status is retried and kept."""
    try:
        json.loads(body.decode("utf-8"))
    except ValueError:
        return "retry"
    if status == 200:
        return "delete"
    return "drop_first" if status == 400 else "retry"


READERS = {"android": read_android, "swift": read_swift, "iphone": read_iphone,
           "react-native": read_react_native}
