"""Routing tables: (endpoint, token) -> Kestrel queue, hot-token overflow, blocklist.

What it is for: `RoutingTable.route()` is called once per record on the hot path and
answers in O(1): a queue name, or `BLOCKED`.  Everything expensive (reading the routes
file, validating it, building the dicts) happens once, in `from_dict`/`from_file`, and a
`Router` swaps a whole new table in with one attribute assignment on reload.

What it must not do: no sockets, no eventlet, no reading of the environment; per record
nothing but a few dict operations (no I/O, scans or regexes; the only file read is the
routes file, at load).  Tables are immutable after build, except for their counters and
the token-bucket state, which are plain ints/dicts updated in place.

Layout (see docs/parts/routing.md):
  _rows: token -> row, where a row is a small dict endpoint -> queue.  Rows are shared:
         every token with the same overrides points at the same row dict, so a million
         tokens cost one dict entry each, not four.  A blocked token's row maps every
         endpoint to BLOCKED.  A token without a row uses _default_row.
  _limiter: None (no "overflow" key) or a _TokenBuckets (GCRA, per token).
  _spill: queue -> queue + suffix, precomputed for every queue the table can return.
"""
import contextlib
import gc
import hashlib
import json
import logging
import math

from ingest.errors import RecordRejected
from ingest.kestrel.protocol import valid_queue_name

ENDPOINTS = ("track", "engage", "groups", "import")
DEFAULT_QUEUES = {"track": "events", "engage": "people", "groups": "groups",
                  "import": "imports"}
# Where the token lives in a record, per endpoint: the `field` of a strict rejection.
TOKEN_FIELDS = {"track": "properties.token", "import": "properties.token",
                "engage": "$token", "groups": "$token"}
TOP_LEVEL_KEYS = ("queues", "tokens", "secrets", "blocked_tokens", "overflow",
                  "strict_tokens")
OVERFLOW_KEYS = ("events_per_second", "burst", "suffix", "max_tracked_tokens")
DEFAULT_RATE = 1000.0
DEFAULT_BURST_SECONDS = 2.0      # burst defaults to two seconds' worth of the rate
DEFAULT_SUFFIX = "_overflow"
DEFAULT_MAX_TRACKED = 100_000    # bucket entries per generation (so at most 2x this)
MIN_GENERATION_S = 10.0          # idle-token sweep period floor (seconds)
MAX_RATE = 1e6                   # per token and second; buckets count in nanoseconds

_log = logging.getLogger("ingest.routing")


class _Blocked:
    """The type of BLOCKED: answer the record as accepted, but do not queue it."""

    __slots__ = ()

    def __repr__(self):
        return "BLOCKED"

    def __reduce__(self):
        return "BLOCKED"


BLOCKED = _Blocked()
_BLOCKED_ROW = {ep: BLOCKED for ep in ENDPOINTS}


class RoutesError(ValueError):
    """A routes file or dict that fails validation; the message names file and line/key."""


# ---- the per-token rate limiter -----------------------------------------------------

class _TokenBuckets:
    """One token bucket per token, as GCRA: each token stores a single number, its
    "theoretical arrival time" (TAT).  A record at `now` is admitted when
    max(TAT, now) + interval - now <= burst * interval, and then TAT moves on by one
    interval; overflowed records leave TAT alone.  This is exactly a bucket of `burst`
    records refilled at `rate` per second, but needs no second field and no per-record
    object other than the number itself.

    Times are integer nanoseconds (`now` rounded to the microsecond).  In float seconds,
    `tat += interval` at epoch magnitudes (ulp 0.24 us) drifts: with rate 5000 and burst
    1 not even one record of a request was admitted.  Integers are exact whatever the
    clock, so a burst of exactly `burst` records at one instant always fits.

    Forgetting idle tokens, O(1) amortised: state lives in two generations, `young` and
    `old`.  Writes go to `young`; a token found only in `old` is carried into `young`
    on its first record of the generation.  Every generation (>= burst/rate), or when
    `young` reaches `max_tracked` entries, `old` is dropped and `young` becomes `old`.
    A token dropped that way was not written for at least one full generation, so its
    TAT is already in the past: its bucket is full, which is the same as having no
    entry, so forgetting on the time rule changes no decision.  The size rule (a flood
    of distinct tokens) may forget a bucket early; then that token gets a fresh burst.
    Dropping a dict frees its entries, each created by one record: O(1) per record.
    """

    __slots__ = ("rate", "burst", "max_tracked", "interval", "limit", "clock_back",
                 "generation_ns", "young", "old", "swap_at")

    def __init__(self, rate, burst, max_tracked):
        self.rate = rate
        self.burst = burst
        self.max_tracked = max_tracked
        self.interval = max(1, round(1e9 / rate))          # ns between records
        self.limit = burst * self.interval
        # Beyond this, a stored TAT cannot come from a clock that only moves forward.
        self.clock_back = self.limit + self.interval
        self.generation_ns = max(self.limit, int(MIN_GENERATION_S * 1e9))
        self.young = {}
        self.old = {}
        self.swap_at = -1 << 80          # the first record starts the first generation

    @property
    def generation_s(self):
        return self.generation_ns / 1e9

    def settings(self):
        return (self.rate, self.burst, self.max_tracked)

    def __len__(self):
        return len(self.young) + len(self.old)

    def _swap(self, now):
        self.old = self.young
        self.young = {}
        self.swap_at = now + self.generation_ns

    def admit(self, token, now):
        """True if the record (at float seconds `now`) fits the token's bucket."""
        # Round to the microsecond first: epoch floats are only good to 0.24 us, so this
        # lands 1795662710.123 s on its exact ns value; the same float always gives the
        # same integer, so the mapping is monotonic.
        now = int(now * 1e6 + 0.5) * 1000
        if now >= self.swap_at:
            self._swap(now)
        young = self.young
        stored = young.get(token)
        if stored is None:
            return self._first_in_generation(token, now)
        tat = (stored if stored > now else now) + self.interval
        if tat - now <= self.limit:
            young[token] = tat
            return True
        if tat - now <= self.clock_back:
            return False          # over the limit: the record overflows, TAT stays
        return self._restart(token, now)

    def _first_in_generation(self, token, now):
        """A token's first record in this generation: carry its state over from `old`
        (or start it), so a token that keeps sending is never dropped, even when a
        flood of new tokens forces early swaps."""
        stored = self.old.get(token, now)
        young = self.young
        if len(young) >= self.max_tracked:
            self._swap(now)
            young = self.young
        tat = (stored if stored > now else now) + self.interval
        if tat - now <= self.limit:
            young[token] = tat
            return True
        if tat - now <= self.clock_back:
            young[token] = stored
            return False
        return self._restart(token, now)

    def _restart(self, token, now):
        """The stored TAT is further ahead than any forward-moving clock allows: `now`
        went backwards.  Start the token afresh and re-arm the sweep from here."""
        self.young[token] = now + self.interval
        self.swap_at = now + self.generation_ns
        return True


# ---- the table ------------------------------------------------------------------------

class RoutingTable:
    """An immutable routing decision table; build with from_dict/from_file."""

    def __init__(self, rows, default_row, strict, secrets, limiter, spill, source):
        self._rows = rows
        self._default_row = default_row
        self.strict_tokens = strict
        self._secrets = secrets
        self._secret_digests = frozenset(_digest(s) for s in secrets.values())
        self._limiter = limiter
        self._spill = spill
        self.source = source
        # Counters the app exports as metrics; Router.reload carries them over.
        self.blocked = 0          # records from blocked tokens (answered, not queued)
        self.unknown = 0          # records whose token has no entry (default queue)
        self.overflowed = {}      # base queue -> records sent to its overflow queue

    # -- building ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data, source="<dict>"):
        """Validate `data` (the parsed routes file) fully and build the table.

        `data` is not modified and not referenced by the table."""
        return cls._checked(data, source, owned=False)

    @classmethod
    def from_file(cls, path):
        with _gc_paused():
            return cls._checked(_parse_file(path), str(path), owned=True)

    @classmethod
    def _checked(cls, data, source, owned):
        with _gc_paused():
            try:
                return _build(cls, data, source, owned)
            except _Invalid as exc:
                raise RoutesError("%s: %s: %s" % (source, exc.path, exc.problem)) from None

    def __len__(self):
        return len(self._rows)

    def __repr__(self):
        return "<RoutingTable %s: %d tokens%s>" % (
            self.source, len(self._rows), ", overflow" if self._limiter else "")

    # -- the hot path -------------------------------------------------------------------
    def route(self, endpoint, token, now):
        """The queue for one record, or BLOCKED; `now` is float seconds (monotonic is best).

        Raises RecordRejected("unknown_token") for an unknown token when strict_tokens.
        """
        # PERF: one dict lookup for the token, one for the endpoint in a shared row:
        # 75-115 ns up to 10,000 tokens, ~400 ns with overflow (bench/routing_bench.py;
        # figures in docs/parts/routing.md).  Inlining admit() here saved only ~25 ns.
        row = self._rows.get(token)
        if row is None:
            if self.strict_tokens:
                raise RecordRejected("unknown_token", TOKEN_FIELDS.get(endpoint),
                                     "token is not in the routing table")
            row = self._default_row
            self.unknown += 1
        queue = row[endpoint]
        if queue is BLOCKED:
            self.blocked += 1
            return BLOCKED
        limiter = self._limiter
        if limiter is None or limiter.admit(token, now):
            return queue
        self.overflowed[queue] = self.overflowed.get(queue, 0) + 1
        return self._spill[queue]

    # -- secrets for /import --------------------------------------------------------------
    def secret(self, token):
        return self._secrets.get(token)

    def secret_matches(self, credential):
        """True if `credential` is one of the configured API secrets.

        The lookup is on SHA-256 digests, so its timing depends only on the digest of
        what the caller sent, which tells an attacker nothing about any secret.
        """
        if not isinstance(credential, str) or not credential:
            return False
        return _digest(credential) in self._secret_digests

    # -- reload support ---------------------------------------------------------------
    def adopt(self, previous):
        """Carry counters, and bucket state when the rate settings are unchanged, over
        from the table this one replaces.  Returns True if bucket state was kept."""
        self.blocked += previous.blocked
        self.unknown += previous.unknown
        # list() copies in one C call, so a thread still routing on `previous` cannot
        # change the dict's size under the loop.
        for queue, count in list(previous.overflowed.items()):
            self.overflowed[queue] = self.overflowed.get(queue, 0) + count
        old, new = previous._limiter, self._limiter
        if old is not None and new is not None and old.settings() == new.settings():
            self._limiter = old
            return True
        return False


@contextlib.contextmanager
def _gc_paused():
    """Pause the cyclic GC while a table is parsed and built.

    PERF: a million-token file makes millions of long-lived containers, and each batch
    of allocations made the collector walk the growing heap again: parse+build took
    3.8 s + 1.0 s with the GC on, 1.1 s + 1.0 s with it paused.  Nothing built here
    forms cycles, and nothing yields to other green threads meanwhile.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def default_table():
    """The table used without a routes file: default queues, no overflow, not strict."""
    return RoutingTable.from_dict({}, source="<defaults>")


def _digest(text):
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


# ---- the Router: holds the current table, swaps it on reload --------------------------

class Router:
    """Holds the current table in `table`, a plain attribute read per record.

    reload() builds and validates the whole new table first and then assigns it in one
    statement, so a request sees either the old table or the new one, never a mix of
    half-loaded state.  Meant to be called from one green thread (server.py's SIGHUP
    watcher), never from the signal handler itself.
    """

    def __init__(self, path=None, log=None):
        self.path = path
        self.log = log or _log
        self.table = RoutingTable.from_file(path) if path else default_table()
        self.reloads = 0
        self.reload_failures = 0

    def reload(self, run=None):
        """Re-read `path`; on any error keep the current table, log why, return False.

        `run(fn, *args)`, if given, runs the parse and build, e.g. eventlet.tpool.execute
        to keep a big file's parse from blocking the event loop; the new table is still
        installed by the caller's thread.
        """
        if self.path is None:
            self.log.info("routes: no routes file, nothing to reload")
            return True
        try:
            if run is None:
                new = RoutingTable.from_file(self.path)
            else:
                new = run(RoutingTable.from_file, self.path)
        except RoutesError as exc:
            self.reload_failures += 1
            self.log.error("routes: reload failed, keeping the last good table: %s", exc)
            return False
        except Exception:       # a bug or MemoryError must not take the worker down either
            self.reload_failures += 1
            self.log.error("routes: reload of %s failed unexpectedly, keeping the last good"
                           " table", self.path, exc_info=True)
            return False
        self.install(new)
        return True

    def install(self, new):
        """Make `new` (already built and validated) the current table.

        Split from reload() so a caller may build the table elsewhere (say, in a worker
        thread) and install it from the thread that routes; nothing here may yield
        between adopting the counters and the assignment.
        """
        kept = new.adopt(self.table)
        self.table = new            # the one atomic step
        self.reloads += 1
        self.log.info("routes: loaded %s (%d tokens, overflow state %s)", new.source,
                      len(new), "kept" if kept else "reset")


# ---- parsing ---------------------------------------------------------------------------

class _Invalid(Exception):
    def __init__(self, path, problem):
        super().__init__(path, problem)
        self.path = path
        self.problem = problem


class _DupDict(dict):
    """A parsed JSON object that had repeated keys (reported when validation reaches it)."""

    duplicates = ()


def _make_pairs_hook():
    """The object hook for one parse: flags repeated keys, and shares equal small
    objects.  A million token entries are mostly the same few `{"track": "events_x"}`
    maps; returning one shared dict for each saves ~200 bytes per token at the load's
    peak (the validator never mutates them)."""
    shared = {}

    def hook(pairs):
        key = None
        if len(pairs) <= len(ENDPOINTS):
            key = tuple(pairs)
            try:
                obj = shared.get(key)
            except TypeError:     # unhashable values: not shareable
                obj = key = None
            if obj is not None:
                return obj
        obj = dict(pairs)
        if len(obj) != len(pairs):
            return _with_duplicates(obj, pairs)
        # Only all-string objects are stored: 1, 1.0 and true are equal as dict keys, but
        # a str equals only a str, so a hit above always had the same value types.
        if key is not None and all(type(v) is str for v in obj.values()):
            shared[key] = obj
        return obj

    return hook


def _with_duplicates(obj, pairs):
    seen, dups = set(), []
    for key, _ in pairs:
        if key in seen and key not in dups:
            dups.append(key)
        seen.add(key)
    obj = _DupDict(obj)
    obj.duplicates = dups
    return obj


def _no_constant(name):
    raise ValueError("%s is not allowed" % name)


def _parse_file(path):
    source = str(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise RoutesError("%s: cannot read: %s" % (source, exc.strerror or exc)) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise RoutesError("%s:%d: not UTF-8 (byte 0x%02x at offset %d)"
                          % (source, line, raw[exc.start], exc.start)) from None
    try:
        return json.loads(text, object_pairs_hook=_make_pairs_hook(), parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise RoutesError("%s:%d:%d: invalid JSON: %s"
                          % (source, exc.lineno, exc.colno, exc.msg)) from None
    except ValueError as exc:   # NaN/Infinity, via _no_constant
        raise RoutesError("%s: invalid JSON: %s" % (source, exc)) from None
    except RecursionError:
        raise RoutesError("%s: invalid JSON: nested too deeply" % source) from None


# ---- validation and build ----------------------------------------------------------------

def _object(value, path):
    if not isinstance(value, dict):
        raise _Invalid(path, "must be a JSON object, not %s" % _kind(value))
    if isinstance(value, _DupDict):
        raise _Invalid(path, "duplicate key %s" % ", ".join(map(json.dumps, value.duplicates)))
    return value


def _kind(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _key_path(parent, key):
    """`tokens.abc`, or `tokens[" abc"]` when the key would be ambiguous after a dot."""
    if not isinstance(key, str):
        return "%s[%r]" % (parent, key)
    if key and key.isprintable() and "." not in key and " " not in key and "[" not in key:
        return "%s.%s" % (parent, key)
    return "%s[%s]" % (parent, json.dumps(key))


def _token(token, path):
    """`path` names the token itself (`tokens.abc`, `blocked_tokens[3]`)."""
    if not isinstance(token, str) or not token:
        raise _Invalid(path, "a token must be a non-empty string, not %s" % _show(token))
    if token.strip() != token:
        raise _Invalid(path, "token has leading or trailing whitespace")
    return token


def _queue(name, path, seen):
    """Validate one queue name (memoised: a million tokens share a few names)."""
    known = seen.get(name) if isinstance(name, str) else None
    if known is not None:
        return known[0]
    if not isinstance(name, str) or not valid_queue_name(name):
        raise _Invalid(path, "queue name must be a non-empty string of at most 200 bytes"
                             " without '.', '/', '~', spaces or control characters, not %s"
                       % _show(name))
    seen[name] = (name, path)    # the first key that named it, for suffix errors
    return name


def _endpoint_map(value, path, seen):
    obj = _object(value, path)
    out = {}
    for endpoint, name in obj.items():
        if endpoint not in DEFAULT_QUEUES:
            raise _Invalid(_key_path(path, endpoint),
                           "unknown endpoint (expected one of %s)" % ", ".join(ENDPOINTS))
        out[endpoint] = _queue(name, "%s.%s" % (path, endpoint), seen)
    return out


def _build(cls, data, source, owned):
    """`owned`: `data` was parsed here and nobody else holds it, so its "tokens" dict
    may become the table's token dict in place (saves a 1M-entry copy on big files)."""
    data = _object(data, "<top level>")
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise _Invalid(_key_path("", key).lstrip("."),
                           "unknown key (expected one of %s)" % ", ".join(TOP_LEVEL_KEYS))
    seen = {}
    overrides = _endpoint_map(data.get("queues", {}), "queues", seen)
    default_row = dict(DEFAULT_QUEUES, **overrides)
    for endpoint, name in default_row.items():
        if endpoint not in overrides:
            _queue(name, "default queue of /%s" % endpoint, seen)
    rows = _token_rows(data.get("tokens", {}), default_row, seen, owned)
    secrets = _secrets(data.get("secrets", {}), rows, default_row)
    for token in _blocked(data.get("blocked_tokens", [])):
        rows[token] = _BLOCKED_ROW   # blocked wins over a "tokens" entry
    strict = data.get("strict_tokens", False)
    if not isinstance(strict, bool):
        raise _Invalid("strict_tokens", "must be true or false, not %s" % _kind(strict))
    limiter, spill = None, {}
    if "overflow" in data:
        limiter, suffix = _overflow(data["overflow"])
        spill = _spill_names(seen, suffix)
    return cls(rows, default_row, strict, secrets, limiter, spill, source)


def _token_rows(value, default_row, seen, in_place):
    """tokens -> {token: row}; tokens with equal overrides share one row dict.

    With `in_place`, each entry is replaced by its row in the same dict (replacing values
    while iterating is safe: the dict's size does not change)."""
    tokens = _object(value, "tokens")
    # An empty object may be one the parse hook shares with other keys ("overflow": {}),
    # so only a non-empty one (whose values are objects: never shared) is reused.
    rows, shared = (tokens if in_place and tokens else {}), {}
    for token, entry in tokens.items():
        if type(token) is not str or not token or token.strip() != token:
            _token(token, _key_path("tokens", token))     # raises with the reason
        try:
            key = tuple(entry.items()) if type(entry) is dict else None
            row = shared.get(key) if key is not None else None
        except TypeError:    # unhashable values (lists...): the slow path reports them
            key = row = None
        if row is None:
            row = dict(default_row)
            row.update(_endpoint_map(entry, _key_path("tokens", token), seen))
            if key is not None:
                shared[key] = row
        rows[token] = row
    return rows


def _secrets(value, rows, default_row):
    secrets = _object(value, "secrets")
    for token, secret in secrets.items():
        path = _key_path("secrets", token)
        _token(token, path)
        if not isinstance(secret, str) or not secret:
            raise _Invalid(path, "a secret must be a non-empty string, not %s" % _kind(secret))
        rows.setdefault(token, default_row)   # a token with a secret is a known token
    return dict(secrets)


def _blocked(value):
    if not isinstance(value, list):
        raise _Invalid("blocked_tokens", "must be an array of tokens, not %s" % _kind(value))
    for i, token in enumerate(value):
        _token(token, "blocked_tokens[%d]" % i)
    return value


def _overflow(value):
    obj = _object(value, "overflow")
    for key in obj:
        if key not in OVERFLOW_KEYS:
            raise _Invalid(_key_path("overflow", key),
                           "unknown key (expected one of %s)" % ", ".join(OVERFLOW_KEYS))
    rate = obj.get("events_per_second", DEFAULT_RATE)
    if (isinstance(rate, bool) or not isinstance(rate, (int, float))
            or not math.isfinite(rate) or not 0 < rate <= MAX_RATE):
        raise _Invalid("overflow.events_per_second",
                       "must be a positive number up to %g, not %s" % (MAX_RATE, _show(rate)))
    burst = obj.get("burst", max(1, round(rate * DEFAULT_BURST_SECONDS)))
    _positive_int(burst, "overflow.burst")
    max_tracked = obj.get("max_tracked_tokens", DEFAULT_MAX_TRACKED)
    _positive_int(max_tracked, "overflow.max_tracked_tokens")
    suffix = obj.get("suffix", DEFAULT_SUFFIX)
    if not isinstance(suffix, str) or not suffix or not valid_queue_name(suffix):
        raise _Invalid("overflow.suffix", "must be a non-empty string allowed in a queue"
                                          " name, not %s" % _show(suffix))
    return _TokenBuckets(float(rate), burst, max_tracked), suffix


def _positive_int(value, path):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _Invalid(path, "must be a positive integer, not %s" % _show(value))


def _show(value):
    """A value for an error message: JSON for scalars (bounded), else its kind."""
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        text = json.dumps(value)
        return text if len(text) <= 80 else text[:77] + "..."
    return _kind(value)


def _spill_names(seen, suffix):
    """queue -> overflow queue, for every queue the table can return."""
    spill = {}
    for name, (_, path) in seen.items():
        over = name + suffix
        if not valid_queue_name(over):
            raise _Invalid("overflow.suffix", "overflow queue for %s (%s) would be longer"
                                              " than 200 bytes" % (_show(name), path))
        if over in seen:
            raise _Invalid("overflow.suffix", "overflow queue %s is also a normal queue (%s)"
                           % (json.dumps(over), seen[over][1]))
        spill[name] = over
    return spill
