"""Kestrel's memcache protocol on the wire: every constant and formatter of both sides.

What it is for: the one place that knows the bytes.  The client (client.py, cluster.py)
builds `set`/`get` commands and reads replies with it; the bundled server (ingest/queue/)
splits request lines, parses `get` keys and frames its replies with it.  So a reply the
server sends and the line the client compares it with are the same constant.

Facts (shared/docs/kestrel-protocol.md): commands are case-insensitive, queue names are
case-sensitive, names containing '.', '/' or '~' are refused, `set` carries
`<queue> <flags> <exptime> <bytes>` then the data and CRLF; a reply is one line + CRLF.

What it must not do: I/O of any kind (no sockets, no files, no clock, no eventlet).
Values in, values out, or an exception from errors.py / ProtocolError.
"""
import collections
import re

from ingest.kestrel.errors import (InvalidQueueName, KestrelProtocolError,
                                   KestrelServerError)

DEFAULT_PORT = 22133
CRLF = b"\r\n"

# ---- reply lines ---------------------------------------------------------------------------
# As a client compares them (the CRLF already stripped) ...
STORED = b"STORED"
NOT_STORED = b"NOT_STORED"
END = b"END"
DELETED = b"DELETED"
ERROR = b"ERROR"
FLUSHED_ALL = b"Flushed all queues."
RELOADED = b"Reloaded config."
ERROR_PREFIXES = (b"ERROR", b"CLIENT_ERROR", b"SERVER_ERROR")
VERSION_PREFIX = b"VERSION "
STAT_PREFIX = b"STAT "
# ... and as the server sends them, framed once here: the server appends these constants
# on its hot path instead of building a line per reply.
STORED_REPLY = STORED + CRLF
NOT_STORED_REPLY = NOT_STORED + CRLF
END_REPLY = END + CRLF
DELETED_REPLY = DELETED + CRLF
ERROR_REPLY = ERROR + CRLF
FLUSHED_ALL_REPLY = FLUSHED_ALL + CRLF
RELOADED_REPLY = RELOADED + CRLF
# A value: header, then the data, then the trailer (the server streams the data between).
VALUE_HEADER = b"VALUE %s 0 %d\r\n"
VALUE_TRAILER = CRLF + END_REPLY


def client_error(text):
    """`CLIENT_ERROR <text>`: a refused request (the server may close afterwards)."""
    return b"CLIENT_ERROR %s\r\n" % text.encode()


def server_error(text):
    """`SERVER_ERROR <text>`: the server cannot serve the request now (then it closes)."""
    return b"SERVER_ERROR %s\r\n" % text.encode("utf-8", "replace")


def count_reply(n):
    """The bare decimal line of flush_expired / flush_all_expired."""
    return b"%d\r\n" % n


def version_reply(version):
    return VERSION_PREFIX + version.encode() + CRLF


def stats_reply(pairs):
    """`STAT <name> <value>` per (name, value) pair, then END."""
    return b"".join(b"STAT %s %s\r\n" % (k.encode("utf-8", "surrogateescape"),
                                         str(v).encode()) for k, v in pairs) + END_REPLY


def format_value(name, data):
    """The reply to a successful get: VALUE line, data, END."""
    return VALUE_HEADER % (name, len(data)) + data + VALUE_TRAILER


# ---- server addresses ----------------------------------------------------------------------

# A host: a DNS name or IPv4 address (letters, digits, '.', '-', '_'), or an IPv6
# address in brackets.  Anything else (a scheme, a path, user@, ';', spaces) is refused,
# so `http://h:1` or `a:1;b:2` can never be mistaken for a host.
_HOST_RE = re.compile(r"(?:[A-Za-z0-9_](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?|\[[0-9A-Fa-f:.]+\])\Z")


def parse_server(text):
    """'host:port' -> ('host', port); ValueError saying what is wrong with `text`."""
    host, sep, port = text.rpartition(":")
    if "://" in text:
        problem = "no scheme (drop %r)" % (text.split("://", 1)[0] + "://")
    elif not sep or not host:
        problem = "host:port needed"
    elif not _HOST_RE.match(host):
        problem = ("host %r is not a name or address (separate servers with ',';"
                   " IPv6 goes in brackets)" % host)
    elif not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        problem = "port must be a number from 1 to 65535"
    else:
        return host.strip("[]"), int(port)
    raise ValueError("%r is not a Kestrel server: %s" % (text, problem))


def parse_servers(servers):
    """'h:p,h:p' or ['h:p', ...] -> [('h', p), ...]; raises ValueError on a bad entry.

    The one parser of every host:port list (settings, command flags, the client):
    strictly `host:port`, the port in 1..65535, no scheme, no other separator than ','.
    `[::1]:p` loses its brackets.  Empty entries are skipped, but at least one server is
    needed.
    """
    if isinstance(servers, str):
        servers = servers.split(",")
    out = [parse_server(text.strip()) for text in servers if text.strip()]
    if not out:
        raise ValueError("at least one Kestrel server (host:port) is needed")
    return out


# ---- queue names and items -----------------------------------------------------------------

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


def check_queue(queue):
    """The queue name as bytes, or InvalidQueueName."""
    if not isinstance(queue, str) or not valid_queue_name(queue):
        raise InvalidQueueName("invalid queue name %r" % (queue,))
    return queue.encode("utf-8")


def as_bytes(data):
    if isinstance(data, bytes):
        return data
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise TypeError("queue items are bytes or str, not %s" % type(data).__name__)


# ---- commands a client sends ---------------------------------------------------------------

def format_command(*tokens):
    """A one-line command such as `delete <q>` or `stats`, framed."""
    return b" ".join(tokens) + CRLF


def format_set(queue, data, expiry=0):
    """The bytes of one `set` command carrying `data` (bytes) onto `queue` (str)."""
    return b"set %s 0 %d %d\r\n%s\r\n" % (queue.encode("utf-8"), expiry, len(data), data)


# The `<length>\r\n` of each item length below this, made once: an item's length
# formatted per set was a fifth of build_sets' instructions.  At most this many entries.
_LENGTH_LINES = {}
_LENGTH_LINES_BELOW = 4096


def build_sets(pairs, expire=0):
    """One buffer holding a `set` per (queue, data) pair, in order.

    PERF: one b"".join over references to the items, each run of one queue with one
    prefix (each name validated once per batch), and the length lines of the usual sizes
    cached: 2,300 instructions per item of a 50-event batch, against 3,160 with a
    prefix looked up and a length formatted per item, and ~70 us per 50 x 1 KiB with
    one b"set %s 0 0 %d..." format per item that checks the name each time.
    """
    parts = []
    tail = b" 0 %d " % int(expire)
    lengths = _LENGTH_LINES
    prefixes = {}
    last = prefix = None
    for queue, data in pairs:
        if queue is not last:     # names decoded per item (the spool's) are equal, not the same
            prefix = prefixes.get(queue)
            if prefix is None:
                prefix = prefixes[queue] = b"set " + check_queue(queue) + tail
            last = queue
        if type(data) is not bytes:
            data = as_bytes(data)
        n = len(data)
        line = lengths.get(n)
        if line is None:
            line = b"%d\r\n" % n
            if n < _LENGTH_LINES_BELOW:
                lengths[n] = line
        parts += (prefix, line, data, CRLF)
    return b"".join(parts)


def get_command(queue, timeout=None, open_=False, close=False, abort=False, peek=False):
    """The `get` line for `queue` with Kestrel's slash options (timeout in ms)."""
    parts = [b"get ", check_queue(queue)]
    if close:
        parts.append(b"/close")
    if open_:
        parts.append(b"/open")
    if abort:
        parts.append(b"/abort")
    if peek:
        parts.append(b"/peek")
    if timeout:
        parts.append(b"/t=%d" % max(0, int(timeout)))
    parts.append(CRLF)
    return b"".join(parts)


# ---- replies a client reads ----------------------------------------------------------------

def split_reply_lines(buf, n):
    """The first min(n, available) complete CRLF lines of `buf`, and the leftover bytes."""
    lines = buf.split(CRLF, n)
    if len(lines) > n:
        return lines[:n], lines[n]
    return lines[:-1], lines[-1]


def count_stored(lines):
    """Indices (into the batch) whose reply line is STORED, and the first error line.

    `lines` are the complete reply lines received so far, one per item in order.
    NOT_STORED is a per-item refusal (queue full, item too large): the stream stays in
    sync.  Anything else ends the usable part of the stream.
    """
    stored = []
    for i, line in enumerate(lines):
        if line == STORED:
            stored.append(i)
        elif line != NOT_STORED:
            return stored, line
    return stored, None


def is_error_reply(line):
    """ERROR, CLIENT_ERROR or SERVER_ERROR."""
    return line.startswith(ERROR_PREFIXES)


def parse_value_header(line):
    """`VALUE <q> <flags> <len>` -> len; None for END; raises on anything else."""
    if line == END:
        return None
    parts = line.split(b" ")
    if parts[0] == b"VALUE" and len(parts) >= 4 and parts[3].isdigit():
        return int(parts[3])
    raise_reply(line)


def raise_reply(line):
    """Raise the error a reply line that is not the expected one stands for."""
    if is_error_reply(line):
        raise KestrelServerError(line.decode("utf-8", "replace"))
    raise KestrelProtocolError("unexpected reply %r" % line.decode("utf-8", "replace")[:200])


def stat_value(text):
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


# Per-queue stat names of Kestrel 2.4, Darner and the bundled server, longest first so
# `queue_q_total_items` is read as (q, total_items) and not (q_total, items).
QUEUE_STATS = sorted((
    "items", "bytes", "total_items", "logsize", "expired_items", "mem_items", "mem_bytes",
    "age", "discarded", "waiters", "open_transactions", "transactions",
    "canceled_transactions", "total_flushes", "journal_rewrites", "journal_rotations",
    "children", "put_items", "put_bytes", "journal_size", "age_msec", "create_time",
    "lost_items",
), key=len, reverse=True)


def parse_stats(lines):
    """STAT lines -> {"server": {k: v}, "queues": {name: {stat: v}}}.

    Queue names may contain `_`, so `queue_<name>_<stat>` is ambiguous; each key is read
    with the queue name that the most keys agree on (ties: the longer stat name).
    """
    server, queued = {}, []
    for line in lines:
        parts = line.split(" ", 2)
        if len(parts) < 3 or parts[0] != "STAT":
            continue
        key, value = parts[1], stat_value(parts[2])
        if key.startswith("queue_"):
            queued.append((key[6:], value))
        else:
            server[key] = value
    candidates = [[(rest[:-len(s) - 1], s) for s in QUEUE_STATS
                   if rest.endswith("_" + s) and len(rest) > len(s) + 1]
                  for rest, _ in queued]
    votes = collections.Counter(name for cands in candidates for name, _ in cands)
    queues = {}
    for (rest, value), cands in zip(queued, candidates):
        if not cands:
            server["queue_" + rest] = value
            continue
        name, stat = max(cands, key=lambda c: (votes[c[0]], len(c[1])))
        queues.setdefault(name, {})[stat] = value
    return {"server": server, "queues": queues}


# ---- requests the server reads ---------------------------------------------------------------

# A request line longer than this is refused: Kestrel has no limit, but an unbounded line
# is an unbounded buffer.  4 KiB is far above any legal `set`/`get` line (names <= 200 B).
MAX_LINE_BYTES = 4096
# memcache exptime rule: below this many seconds it is relative, at or above absolute.
RELATIVE_EXPIRY_LIMIT_S = 1000000
# The largest expiry a journal can hold: its records keep the time in ms as an int64.
MAX_EXPTIME_S = (2 ** 63 - 1) // 1000
# Storage commands Kestrel refuses with CLIENT_ERROR; their data block is still consumed so
# the stream stays in sync.
UNSUPPORTED_STORAGE = frozenset((b"add", b"replace", b"append", b"prepend", b"cas"))


class ProtocolError(ValueError):
    """A request the server answers with CLIENT_ERROR and then closes the connection."""


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
