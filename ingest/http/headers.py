"""Request header blocks parsed without the `email` package, where that is exact.

What it is for: the standard library's HTTP server hands every header block to
email.parser, which costs about a quarter of a bare eventlet hello-world's CPU.
`parse_plain(lines)` reads a block of plain header lines (a token, a colon, a value on
one line) into a `PlainHeaders` that answers what the server and eventlet ask of
email.message.Message (get, get_all, get_content_type, defects, _headers) with the same
values; any block it cannot read exactly like the email parser would (folded lines, a
name that is not a token, a CR inside a value, ...) returns None and the caller uses the
email parser as before.  tests/unit/test_headers.py compares both on generated blocks.

What it must not do: accept a block the email parser would read differently, or do I/O.
"""
import re

# One header line as the email parser (policy compat32) reads it when it is plain: the
# name is a token; the value loses leading spaces and tabs and its line ending only.
# Values keep to tab, printable ASCII and latin-1 letters: the email package splits
# lines at more than CR and LF (\x0b, \x0c, \x1c-\x1e, \x85 among others).
_PLAIN_BLOCK = re.compile(
    r"(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t\x20-\x7e\x80-\x84\x86-\xff]*\r?\n)*\Z")
_LINE = re.compile(r"([^:]+):[ \t]*([^\r\n]*)\r?\n")


class PlainHeaders:
    """The parts of email.message.Message that the worker's HTTP stack uses: get,
    get_all, get_content_type, defects and _headers."""

    __slots__ = ("_headers", "_by_name")

    defects = ()

    def __init__(self, pairs):
        self._headers = pairs            # [(name, value)], as sent, in order
        # PERF: every value under its lower-cased name, built once: get_all lower-cased
        # each header's name on every call (32 str.lower calls per request in all).
        by_name = {}
        for name, value in pairs:
            key = name.lower()
            values = by_name.get(key)
            if values is None:
                by_name[key] = [value]
            else:
                values.append(value)
        self._by_name = by_name

    def get(self, name, failobj=None):
        values = self._by_name.get(name.lower())
        return failobj if values is None else values[0]

    def get_all(self, name, failobj=None):
        values = self._by_name.get(name.lower())
        return failobj if values is None else list(values)

    def get_content_type(self):
        """Only asked when there is no Content-Type: the email package's default."""
        value = self.get("content-type")
        if value is None:
            return "text/plain"
        main = value.split(";", 1)[0].strip().lower()
        return main if main.count("/") == 1 else "text/plain"


def parse_plain(lines):
    """PlainHeaders for header `lines` (bytes, each with its line ending, the blank line
    that ends the block not included), or None when the email parser must decide."""
    text = b"".join(lines).decode("latin-1")
    if _PLAIN_BLOCK.match(text) is None:
        return None
    return PlainHeaders(_LINE.findall(text))
