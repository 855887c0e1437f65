"""Raw record -> clean record (mutated in place) and its token, or RecordRejected.

Pure: takes values, returns values or raises; no I/O, no eventlet.  The rules are the
record contract in docs/http-api.md ("What lands on the queue").
A record is rejected with a stable `reason` (the metric label) and the `field` it is
about; the verbose answer reads "record 3: properties.token is missing".
"""
from ingest.errors import RecordRejected

MS_THRESHOLD = 1e11              # a time above this is in milliseconds (1e11 s is year 5138)
MAX_AGE_S = 5 * 24 * 3600        # /track refuses events older than this (/import's job)
MAX_FUTURE_S = 3600              # later than this is clamped (track) or refused (import)
IMPORT_MIN_TIME_S = 31536000     # 1971-01-01: /import refuses anything earlier
MAX_TIME_MAGNITUDE = 1e15        # far beyond any real time in ms; bigger is not a time
_TIME_MIN = -MAX_TIME_MAGNITUDE
# The same bounds as integers (exact: both are whole numbers below 2**53).
_INT_TIME_MAX, _INT_MS_THRESHOLD = int(MAX_TIME_MAGNITUDE), int(MS_THRESHOLD)
_INT_TIME_MIN = -_INT_TIME_MAX

# Every operation an official SDK sends (docs/http-api.md has the table by SDK): $merge is
# Android's People.merge(); no SDK sends $add, $append or $merge to /groups.
ENGAGE_OPS = ("$set", "$set_once", "$add", "$append", "$union", "$remove", "$unset", "$delete",
              "$merge")
GROUP_OPS = ("$set", "$set_once", "$union", "$remove", "$unset", "$delete")
# The type each operation's value must have ($delete's value is ignored: the SDKs send
# "", null, {} or "null").
_OP_TYPES = {"$set": dict, "$set_once": dict, "$add": dict, "$append": dict, "$union": dict,
             "$remove": dict, "$unset": list, "$merge": dict}


class Context:
    """What cleaning needs from the request: arrival time, client IP, limits."""

    __slots__ = ("now", "now_ms", "now_rounded", "oldest", "latest", "ip", "max_properties",
                 "max_depth", "max_string", "long_strings", "values_checked")

    def __init__(self, now, ip=None, max_properties=255, max_depth=20, max_string=65536,
                 data_chars=None, nesting=None):
        self.now = now
        self.now_ms = int(now * 1000)
        self.now_rounded = round(now, 3)          # a time filled in or clamped
        self.oldest = now - MAX_AGE_S             # /track: older is refused
        self.latest = now + MAX_FUTURE_S          # later is clamped (track) or refused
        self.ip = ip                      # set only when the request asked for ip=1
        self.max_properties = max_properties
        self.max_depth = max_depth        # nesting below the properties object
        self.max_string = max_string      # characters in one string value
        # No string can be longer than the request's whole `data` text: when that is short
        # enough, string lengths need no checking at all.
        self.long_strings = data_chars is None or data_chars > max_string
        # `nesting` (decode.nesting_bound) bounds how deep any event of the request can be
        # nested: when no string can be too long and no event too deep, the value checks
        # of the /track fast path cannot refuse anything and are skipped.
        self.values_checked = self.long_strings or nesting is None or nesting > max_depth


_CONTAINERS = (dict, list)


def check_values(obj, ctx, field, depth=0):
    """Refuse strings longer than max_string and nesting deeper than max_depth.

    PERF: when no string can be too long (ctx.long_strings is False) only containers
    need a look, and `set(map(type, ...))` finds whether there are any at C speed; the
    per-value Python loop runs only for requests with long data or nested values.
    """
    if depth > ctx.max_depth:
        raise RecordRejected("too_deep", field, "record", limit=ctx.max_depth)
    values = obj.values() if type(obj) is dict else obj
    if ctx.long_strings:
        limit = ctx.max_string
        for value in values:
            kind = type(value)
            if kind is str:
                if len(value) > limit:
                    raise RecordRejected("string_too_long", field, limit=limit)
            elif kind is dict or kind is list:
                check_values(value, ctx, field, depth + 1)
        return
    kinds = set(map(type, values))
    if dict in kinds or list in kinds:
        for value in values:
            if type(value) in _CONTAINERS:
                check_values(value, ctx, field, depth + 1)


def _check_other_keys(record, checked, ctx):
    """String-length and depth limits for the record's keys not already checked."""
    for key, value in record.items():
        if key not in checked and type(value) in (str, dict, list):
            check_values({key: value}, ctx, key)


def _required_str(value, reason, field):
    """`value` if it is a non-empty string, else RecordRejected naming `field`."""
    if isinstance(value, str) and value != "":
        return value
    raise RecordRejected(reason, field, "message" if value is None else "wrong_type")


def _nonempty_str(value):
    return isinstance(value, str) and value != ""


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _event_time(props, ctx, importing):
    """Normalise properties.time to seconds; fill it (track) or require it (import)."""
    t = props.get("time")
    if t is None:
        if importing:
            raise RecordRejected("missing_time", "properties.time")
        props["time"] = ctx.now_rounded
        return
    # The bound keeps t / 1000.0 from overflowing on a 400-digit integer.
    if not _number(t) or not -MAX_TIME_MAGNITUDE < t < MAX_TIME_MAGNITUDE:
        raise RecordRejected("invalid_time", "properties.time")
    if t > MS_THRESHOLD:
        t = t / 1000.0
        props["time"] = t
    if importing:
        if t < IMPORT_MIN_TIME_S:
            raise RecordRejected("time_too_old", "properties.time", "before_1971")
        if t > ctx.latest:
            raise RecordRejected("time_in_future", "properties.time")
    else:
        if t < ctx.oldest:
            raise RecordRejected("time_too_old", "properties.time")
        if t > ctx.latest:
            props["time"] = ctx.now_rounded


def clean_event(record, ctx, importing=False):
    """/track (and /import with importing=True): returns the record's token.

    PERF: a /track event of the usual shape (event and token non-empty strings, a
    numeric or absent time) is cleaned by clean_track with the checks inlined, and
    without the value checks when the request is known to be shallow (1.6 against
    4.9 us for the wrk bench's 9-property event); anything else, and every rejection, goes through the full checks, in their
    order, so reasons and fields are as they were."""
    if importing:
        return _clean_event_checked(record, ctx, True)
    return clean_track(record, ctx)


def clean_track(record, ctx):
    """/track: a usual event cleaned with its checks inlined; anything else by the full
    checks (which decide; nothing was changed in the record before they run)."""
    if type(record) is not dict:
        return _clean_event_checked(record, ctx, False)
    props = record.get("properties")
    event = record.get("event")
    if type(props) is not dict or type(event) is not str or not event:
        return _clean_event_checked(record, ctx, False)
    token = props.get("token")
    if type(token) is not str or not token or len(props) > ctx.max_properties:
        return _clean_event_checked(record, ctx, False)
    t = props.get("time")
    kind = type(t)
    # PERF: an integer time (the usual milliseconds) is compared with integer bounds and
    # divided by an integer: an int of two digits (any time in ms) against a float goes
    # through _PyLong_Frexp, three times per event (-3% of a 50-event batch's
    # instructions).  t / 1000 is t / 1000.0 for every |t| < 2**53.
    if kind is int:
        if not _INT_TIME_MIN < t < _INT_TIME_MAX:
            return _clean_event_checked(record, ctx, False)
        seconds = t / 1000 if t > _INT_MS_THRESHOLD else t
    elif kind is float:
        if not _TIME_MIN < t < MAX_TIME_MAGNITUDE:
            return _clean_event_checked(record, ctx, False)
        seconds = t / 1000.0 if t > MS_THRESHOLD else t
    elif t is not None:
        return _clean_event_checked(record, ctx, False)
    if ctx.values_checked:
        check_values(props, ctx, "properties")
        if len(record) > 2:   # anything besides event and properties gets the same limits
            _check_other_keys(record, ("event", "properties"), ctx)
    if t is None:
        props["time"] = ctx.now_rounded
    else:
        if seconds is not t:
            props["time"] = seconds
        if seconds < ctx.oldest:
            raise RecordRejected("time_too_old", "properties.time")
        if seconds > ctx.latest:
            props["time"] = ctx.now_rounded
    props["mp_processing_time_ms"] = ctx.now_ms
    if ctx.ip is not None and "ip" not in props:
        props["ip"] = ctx.ip
    return token


def _clean_event_checked(record, ctx, importing):
    """Every check, in the order that decides which reason a bad record gets."""
    if not isinstance(record, dict):
        raise RecordRejected("not_an_object", "record")
    _required_str(record.get("event"), "invalid_event", "event")
    props = record.get("properties")
    if not isinstance(props, dict):
        raise RecordRejected("invalid_properties", "properties",
                             "message" if props is None else "wrong_type")
    token = _required_str(props.get("token"), "missing_token", "properties.token")
    if len(props) > ctx.max_properties:
        raise RecordRejected("too_many_properties", "properties", limit=ctx.max_properties)
    check_values(props, ctx, "properties")
    if len(record) > 2:   # anything besides event and properties gets the same limits
        _check_other_keys(record, ("event", "properties"), ctx)
    if importing:
        if props.get("distinct_id") in (None, ""):
            raise RecordRejected("missing_distinct_id", "properties.distinct_id")
        if not _nonempty_str(props.get("$insert_id")):
            raise RecordRejected("missing_insert_id", "properties.$insert_id")
    _event_time(props, ctx, importing)
    props["mp_processing_time_ms"] = ctx.now_ms
    if ctx.ip is not None and "ip" not in props:
        props["ip"] = ctx.ip
    return token


def _clean_update(record, ctx, ids, ops):
    """/engage and /groups share a shape: $token, identity keys, exactly one operation."""
    if not isinstance(record, dict):
        raise RecordRejected("not_an_object", "record")
    token = _required_str(record.get("$token"), "missing_token", "$token")
    for key in ids:
        value = record.get(key)
        if not (_nonempty_str(value) or _number(value)):
            raise RecordRejected("missing_" + key[1:], key)
    # Operations are counted over every known one, so a /groups record with $add reads
    # "got $add" rather than "got none", and $set beside $add is two operations.
    present = [op for op in ENGAGE_OPS if op in record]
    if len(present) != 1 or present[0] not in ops:
        raise RecordRejected("invalid_operation", "operation", ops=" ".join(ops),
                             present=" ".join(present) or "none")
    op = present[0]
    wanted = _OP_TYPES.get(op)
    if wanted is not None:
        value = record[op]
        if not isinstance(value, wanted):
            raise RecordRejected("invalid_operation", op, "wrong_type",
                                 kind="an object" if wanted is dict else "an array")
        if len(value) > ctx.max_properties:
            raise RecordRejected("too_many_properties", op, limit=ctx.max_properties)
        check_values(value, ctx, op)
    _check_other_keys(record, (op,), ctx)
    if ctx.ip is not None and "$ip" not in record:
        record["$ip"] = ctx.ip
    return token


def clean_engage(record, ctx):
    return _clean_update(record, ctx, ("$distinct_id",), ENGAGE_OPS)


def clean_group(record, ctx):
    return _clean_update(record, ctx, ("$group_key", "$group_id"), GROUP_OPS)


def cleaner(endpoint):
    """The clean function for an endpoint name (track, engage, groups, import)."""
    if endpoint == "track":
        return clean_track
    if endpoint == "import":
        return lambda record, ctx: clean_event(record, ctx, importing=True)
    if endpoint == "engage":
        return clean_engage
    if endpoint == "groups":
        return clean_group
    raise KeyError(endpoint)
