"""The routes file: parse, validate and build the parts of a RoutingTable.

What it is for: everything expensive about routing happens here, once per load: reading
the JSON, validating every key with an error that names the file and the key, and
building the shared per-token rows.  `build()` returns the constructor arguments of
ingest.routing.table.RoutingTable.

What it must not do: accept a file it cannot fully validate (a reload keeps the last good
table instead), mutate data it does not own, or read anything but the one file.
"""
import json
import math

from ingest.kestrel.protocol import valid_queue_name
from ingest.routing.limiter import (DEFAULT_BURST_SECONDS, DEFAULT_MAX_TRACKED, DEFAULT_RATE,
                                    MAX_RATE, TokenBuckets)

ENDPOINTS = ("track", "engage", "groups", "import")
DEFAULT_QUEUES = {"track": "events", "engage": "people", "groups": "groups",
                  "import": "imports"}
TOP_LEVEL_KEYS = ("queues", "tokens", "secrets", "blocked_tokens", "overflow",
                  "strict_tokens")
OVERFLOW_KEYS = ("events_per_second", "burst", "suffix", "max_tracked_tokens")
DEFAULT_SUFFIX = "_overflow"


class RoutesError(ValueError):
    """A routes file or dict that fails validation; the message names file and line/key."""


class Invalid(Exception):
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


def parse_file(path, source=None):
    """The parsed JSON of `path`; RoutesError naming `source` (default: the path)."""
    source = str(path) if source is None else source
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
        raise Invalid(path, "must be a JSON object, not %s" % _kind(value))
    if isinstance(value, _DupDict):
        raise Invalid(path, "duplicate key %s" % ", ".join(map(json.dumps, value.duplicates)))
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
        raise Invalid(path, "a token must be a non-empty string, not %s" % _show(token))
    if token.strip() != token:
        raise Invalid(path, "token has leading or trailing whitespace")
    return token


def _queue(name, path, seen):
    """Validate one queue name (memoised: a million tokens share a few names)."""
    known = seen.get(name) if isinstance(name, str) else None
    if known is not None:
        return known[0]
    if not isinstance(name, str) or not valid_queue_name(name):
        raise Invalid(path, "queue name must be a non-empty string of at most 200 bytes"
                             " without '.', '/', '~', spaces or control characters, not %s"
                       % _show(name))
    seen[name] = (name, path)    # the first key that named it, for suffix errors
    return name


def _endpoint_map(value, path, seen):
    obj = _object(value, path)
    out = {}
    for endpoint, name in obj.items():
        if endpoint not in DEFAULT_QUEUES:
            raise Invalid(_key_path(path, endpoint),
                           "unknown endpoint (expected one of %s)" % ", ".join(ENDPOINTS))
        out[endpoint] = _queue(name, "%s.%s" % (path, endpoint), seen)
    return out


def build(data, source, owned, blocked_row):
    """`owned`: `data` was parsed here and nobody else holds it, so its "tokens" dict
    may become the table's token dict in place (saves a 1M-entry copy on big files)."""
    data = _object(data, "<top level>")
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise Invalid(_key_path("", key).lstrip("."),
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
        rows[token] = blocked_row    # blocked wins over a "tokens" entry
    strict = data.get("strict_tokens", False)
    if not isinstance(strict, bool):
        raise Invalid("strict_tokens", "must be true or false, not %s" % _kind(strict))
    limiter, spill = None, {}
    if "overflow" in data:
        limiter, suffix = _overflow(data["overflow"])
        spill = _spill_names(seen, suffix)
    return rows, default_row, strict, secrets, limiter, spill, source


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
            raise Invalid(path, "a secret must be a non-empty string, not %s" % _kind(secret))
        rows.setdefault(token, default_row)   # a token with a secret is a known token
    return dict(secrets)


def _blocked(value):
    if not isinstance(value, list):
        raise Invalid("blocked_tokens", "must be an array of tokens, not %s" % _kind(value))
    for i, token in enumerate(value):
        _token(token, "blocked_tokens[%d]" % i)
    return value


def _overflow(value):
    obj = _object(value, "overflow")
    for key in obj:
        if key not in OVERFLOW_KEYS:
            raise Invalid(_key_path("overflow", key),
                           "unknown key (expected one of %s)" % ", ".join(OVERFLOW_KEYS))
    rate = obj.get("events_per_second", DEFAULT_RATE)
    if (isinstance(rate, bool) or not isinstance(rate, (int, float))
            or not math.isfinite(rate) or not 0 < rate <= MAX_RATE):
        raise Invalid("overflow.events_per_second",
                       "must be a positive number up to %g, not %s" % (MAX_RATE, _show(rate)))
    burst = obj.get("burst", max(1, round(rate * DEFAULT_BURST_SECONDS)))
    _positive_int(burst, "overflow.burst")
    max_tracked = obj.get("max_tracked_tokens", DEFAULT_MAX_TRACKED)
    _positive_int(max_tracked, "overflow.max_tracked_tokens")
    suffix = obj.get("suffix", DEFAULT_SUFFIX)
    if not isinstance(suffix, str) or not suffix or not valid_queue_name(suffix):
        raise Invalid("overflow.suffix", "must be a non-empty string allowed in a queue"
                                          " name, not %s" % _show(suffix))
    return TokenBuckets(float(rate), burst, max_tracked), suffix


def _positive_int(value, path):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise Invalid(path, "must be a positive integer, not %s" % _show(value))


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
            raise Invalid("overflow.suffix", "overflow queue for %s (%s) would be longer"
                                              " than 200 bytes" % (_show(name), path))
        if over in seen:
            raise Invalid("overflow.suffix", "overflow queue %s is also a normal queue (%s)"
                           % (json.dumps(over), seen[over][1]))
        spill[name] = over
    return spill
