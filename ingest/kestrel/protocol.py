"""Kestrel memcache-protocol pieces shared by the client and the bundled server.

Facts (shared/docs/kestrel-protocol.md): commands are case-insensitive, queue names are
case-sensitive, names containing '.', '/' or '~' are refused, `set` carries
`<queue> <flags> <exptime> <bytes>` then the data and CRLF.  Pure functions, no I/O.
"""

CRLF = b"\r\n"
ILLEGAL_NAME_CHARS = (".", "/", "~")
# memcache clients cap the whole key token at 250 bytes; journals are named after queues.
MAX_NAME_BYTES = 200


def valid_queue_name(name):
    """True for a name the server will create a queue for."""
    if not name or len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        return False
    if any(c in name for c in ILLEGAL_NAME_CHARS):
        return False
    return not any(c <= " " or c == "\x7f" for c in name)


def format_set(queue, data, expiry=0):
    """The bytes of one `set` command carrying `data` (bytes) onto `queue` (str)."""
    return b"set %s 0 %d %d\r\n%s\r\n" % (queue.encode("utf-8"), expiry, len(data), data)


# ---- request parsing shared by the server (and usable by clients) ----------------------

# A request line longer than this is refused: Kestrel has no limit, but an unbounded line
# is an unbounded buffer.  4 KiB is far above any legal `set`/`get` line (names <= 200 B).
MAX_LINE_BYTES = 4096
# memcache exptime rule: below this many seconds it is relative, at or above absolute.
RELATIVE_EXPIRY_LIMIT_S = 1000000


class ProtocolError(ValueError):
    """A request the server answers with CLIENT_ERROR and then closes the connection."""


class GetRequest:
    """A parsed `get <queue>[/option...]` key."""

    __slots__ = ("name", "timeout_ms", "open", "close", "abort", "peek")

    def __init__(self, name, timeout_ms=None, open=False, close=False, abort=False,
                 peek=False):
        self.name = name
        self.timeout_ms = timeout_ms
        self.open = open
        self.close = close
        self.abort = abort
        self.peek = peek

    def __repr__(self):
        flags = [f for f in ("open", "close", "abort", "peek") if getattr(self, f)]
        return "GetRequest(%r, t=%r, %s)" % (self.name, self.timeout_ms, "/".join(flags))

    def __eq__(self, other):
        return isinstance(other, GetRequest) and all(
            getattr(self, s) == getattr(other, s) for s in self.__slots__)


# Option pairs Kestrel refuses with CLIENT_ERROR + disconnect (kestrel-protocol.md §1.3).
_FORBIDDEN = (("peek", "open"), ("peek", "close"), ("abort", "open"), ("abort", "close"),
              ("peek", "abort"))


def parse_get_key(key):
    """`q/close/open/t=500` -> GetRequest; raises ProtocolError for illegal combinations.

    Options are slash-separated in any order; unknown options are ignored as Kestrel does;
    a non-numeric or negative `t=` is refused (Kestrel drops the connection there).
    """
    name, _, rest = key.partition("/")
    req = GetRequest(name)
    for opt in rest.split("/") if rest else ():
        if opt in ("open", "close", "abort", "peek"):
            setattr(req, opt, True)
        elif opt.startswith("t="):
            req.timeout_ms = _parse_timeout(opt[2:])
    if not name:
        raise ProtocolError("empty queue name")
    for a, b in _FORBIDDEN:
        if getattr(req, a) and getattr(req, b):
            raise ProtocolError("cannot combine /%s and /%s" % (a, b))
    return req


def _parse_timeout(text):
    if not text.isdigit():
        raise ProtocolError("bad timeout")
    return int(text)


def expiry_ms(exptime, now_ms):
    """memcache exptime -> absolute expiry in ms, 0 for never.

    0 = never; 1..999,999 = seconds from now; >= 1,000,000 = absolute Unix seconds;
    negative = already expired (as memcached does).
    """
    if exptime == 0:
        return 0
    if exptime < 0:
        return max(1, now_ms - 1)
    if exptime < RELATIVE_EXPIRY_LIMIT_S:
        return now_ms + exptime * 1000
    return exptime * 1000


def split_request(line):
    """One request line (bytes, no LF) -> list of tokens, the command lower-cased.

    A trailing CR is dropped; tokens are split on single spaces like naggati does, so
    doubled spaces produce empty tokens.
    """
    if line.endswith(b"\r"):
        line = line[:-1]
    parts = line.split(b" ")
    parts[0] = parts[0].lower()
    return parts


def format_value(name, data):
    """The reply to a successful get: VALUE line, data, END."""
    return b"VALUE %s 0 %d\r\n%s\r\nEND\r\n" % (name, len(data), data)


# TEMPORARY (replaced by the queue/kestrel split): the one host:port list parser.
DEFAULT_PORT = 22133


def parse_servers(servers):
    from ingest.kestrel.client import parse_servers as parse
    return parse(servers)
