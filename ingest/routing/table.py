"""Routing tables: (endpoint, token) -> Kestrel queue, hot-token overflow, blocklist.

What it is for: `RoutingTable.route()` answers for one record in O(1): a queue name, or
`BLOCKED`; `route_many()` answers for a batch's records, as route() of each would.
Everything expensive (reading the routes file, validating it, building the dicts)
happens once, in ingest/routing/routes_file.py, and a `Router` swaps a whole new table
in with one attribute assignment on reload.

What it must not do: no sockets, no eventlet, no reading of the environment; per record
nothing but a few dict operations and comparisons (no I/O, table scans or regexes).
Tables are immutable after build, except for their counters and the token-bucket state,
which are plain ints/dicts updated in place.

Layout (see docs/routing.md):
  _rows: token -> row, where a row is a small dict endpoint -> queue.  Rows are shared:
         every token with the same overrides points at the same row dict, so a million
         tokens cost one dict entry each, not four.  A blocked token's row maps every
         endpoint to BLOCKED.  A token without a row uses _default_row.
  _limiter: None (no "overflow" key) or a TokenBuckets (GCRA, per token).
  _spill: queue -> queue + suffix, precomputed for every queue the table can return.
"""
import contextlib
import gc
import hashlib
import logging

from ingest.errors import RecordRejected
from ingest.routing import routes_file
from ingest.routing.routes_file import ENDPOINTS, RoutesError

# Where the token lives in a record, per endpoint: the `field` of a strict rejection.
TOKEN_FIELDS = {"track": "properties.token", "import": "properties.token",
                "engage": "$token", "groups": "$token"}

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
    def from_file(cls, path, source=None):
        """The table of the file at `path`; messages and `source` name `source` (default:
        the path), so a copy can be checked under the name of the file it came from."""
        source = str(path) if source is None else source
        with _gc_paused():
            return cls._checked(routes_file.parse_file(path, source), source, owned=True)

    @classmethod
    def _checked(cls, data, source, owned):
        with _gc_paused():
            try:
                return cls(*routes_file.build(data, source, owned, _BLOCKED_ROW))
            except routes_file.Invalid as exc:
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
        # figures in docs/routing.md).  Inlining admit() here saved only ~25 ns.
        row = self._rows.get(token)
        if row is None:
            if self.strict_tokens:
                raise RecordRejected("unknown_token", TOKEN_FIELDS.get(endpoint))
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

    def route_many(self, endpoint, tokens, now):
        """route() of each of `tokens` in turn: their queues, counted as route() counts.
        A strict table raises route()'s RecordRejected at the first unknown token, the
        tokens before it counted: the app routes record by record there instead.

        PERF: without overflow, a queue depends on the token alone: a batch whose records
        share one token (the usual) is looked up once and counted in one step, and any
        other is looked up in one loop, without a route() call per record: that loop
        repeats route()'s row lookup and unknown count, because a route() call per
        record cost the mixed SDK log 5,000 instructions per request (1 %), and a
        Counter of the tokens cost a 50-event batch 54,000."""
        if self._limiter is not None or self.strict_tokens:
            route = self.route
            return [route(endpoint, token, now) for token in tokens]
        n = len(tokens)
        if tokens.count(tokens[0]) == n:
            queue = self.route(endpoint, tokens[0], now)
            if tokens[0] not in self._rows:
                self.unknown += n - 1
            if queue is BLOCKED:
                self.blocked += n - 1
            return [queue] * n
        rows, queues, unknown = self._rows, [], 0
        for token in tokens:
            row = rows.get(token)
            if row is None:
                row = self._default_row
                unknown += 1
            queues.append(row[endpoint])
        self.unknown += unknown
        self.blocked += queues.count(BLOCKED)
        return queues

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


class Router:
    """Holds the current table in `table`, a plain attribute read per record.

    reload() builds and validates the whole new table first and then assigns it in one
    statement, so a request sees either the old table or the new one, never a mix of
    half-loaded state.  Meant to be called from one green thread (server.py's SIGHUP
    watcher), never from the signal handler itself.
    """

    def __init__(self, path=None, log=None, loader=None, table=None):
        """`loader(path)` builds a table (default RoutingTable.from_file; the worker's
        keeps a copy of each good file); `table` starts with a table built elsewhere."""
        self.path = path
        self.log = log or _log
        self.loader = loader
        if table is None:
            table = self._load(path) if path else default_table()
        self.table = table
        # Why the table in use is not the routes file's (None: it is).
        self.stale = None
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
                new = self._load(self.path)
            else:
                new = run(self._load, self.path)
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

    def _load(self, path):
        return (self.loader or RoutingTable.from_file)(path)

    def install(self, new):
        """Make `new` (already built and validated) the current table.

        Split from reload() so a caller may build the table elsewhere (say, in a worker
        thread) and install it from the thread that routes; nothing here may yield
        between adopting the counters and the assignment.
        """
        kept = new.adopt(self.table)
        self.table = new            # the one atomic step
        self.stale = None
        self.reloads += 1
        self.log.info("routes: loaded %s (%d tokens, overflow state %s)", new.source,
                      len(new), "kept" if kept else "reset")


