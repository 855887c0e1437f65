"""What an answer says about the records of its request: accepted, rejected (and why),
or not told.

The API answers 200 whether or not the records were taken: `1` (at least one record
accepted) or `0` (none), or with verbose=1 `{"status": 1|0, "error": "record 3: ..."}`
naming the first rejected record, or /import strict=1 JSON counting every record.  So
the replay counts, per request of `n` records (counted when the log was read):

    accepted    records the answer says were taken
    rejected    records the answer says were refused, by reason (the catalogue's name,
                ingest/errors.py, read back from the message)
    uncertain   records whose fate the answer does not tell: the rest of a batch that
                was partly rejected (only the first rejection is named), a plain `1` to
                a batch (replay with --verbose to know), a pixel or a redirect
    failed      records of requests that failed (5xx, connection errors)

Whole requests refused before any record was read (undecodable data, 4xx) are counted
apart by reason, with their records (if the replay could decode them) as rejected.

This module only reads answers; it never sends anything.
"""
import json
import re

from ingest.errors import REASONS

ACCEPTED, REJECTED, UNCERTAIN, FAILED = "accepted", "rejected", "uncertain", "failed"
PLAIN_ZERO = "answer 0 (replay with --verbose for the reason)"
UNRECOGNISED = "unrecognised message"
_RECORD_PREFIX = re.compile(r"record \d+: ")
_PLACEHOLDER = re.compile(r"\{(\w+)\}")
# Several reasons share the "{field} is missing" wording; the field tells them apart.
_FIELD_REASONS = {
    "event": "invalid_event", "properties.token": "missing_token", "$token": "missing_token",
    "properties.distinct_id": "missing_distinct_id", "$distinct_id": "missing_distinct_id",
    "properties.$insert_id": "missing_insert_id", "$group_key": "missing_group_key",
    "$group_id": "missing_group_id", "properties.time": "missing_time",
    "properties": "invalid_properties",
}
_VERBOSE_OK = (b'{"status": 1, "error": null}', b'{"status":1,"error":null}')


def _pattern(template):
    parts, pos = [], 0
    for m in _PLACEHOLDER.finditer(template):
        parts.append(re.escape(template[pos:m.start()]))
        parts.append("(?P<field>.+?)" if m.group(1) == "field" else ".+?")
        pos = m.end()
    parts.append(re.escape(template[pos:]))
    return re.compile("".join(parts) + r"\Z")


# (reason, pattern, length of its fixed text): when several match, the one that fixes
# more of the message is the more specific ("{field} must be a number" over "{field}
# must be {kind}").
_CATALOGUE = [(name, _pattern(text), len(_PLACEHOLDER.sub("", text)))
              for name, entry in REASONS.items() for text in entry.messages.values()]
_CACHE = {}


def reason_of(message):
    """The catalogue reason an answer's message stands for (the `record N: ` prefix
    dropped); UNRECOGNISED when none matches."""
    reason = _CACHE.get(message)
    if reason is None:
        reason = _CACHE[message] = _match(_RECORD_PREFIX.sub("", message, count=1))
    return reason


def _match(text):
    found = {}
    for name, pattern, fixed in _CATALOGUE:
        m = pattern.match(text)
        if m:
            found[name] = (fixed, m.groupdict().get("field"))
    if not found:
        return UNRECOGNISED
    best = max(fixed for fixed, _ in found.values())
    found = {name: field for name, (fixed, field) in found.items() if fixed == best}
    if len(found) == 1:
        return next(iter(found))
    chosen = _FIELD_REASONS.get(next((f for f in found.values() if f), None))
    return chosen if chosen in found else sorted(found)[0]


def _count(counts, key, n):
    if n:
        counts[key] = counts.get(key, 0) + n


def tally(counts, status, body, n, strict):
    """Add what one answer says about its `n` records to `counts` (a dict:
    "accepted", "uncertain", "failed", "rejected:<reason>", "refused:<reason>")."""
    if status >= 500:
        _count(counts, FAILED, n)
        return
    if body in _VERBOSE_OK or (body == b"1" and n <= 1):
        _count(counts, ACCEPTED, max(n, 1))
        return
    if body == b"1":        # at least one of the batch was taken; which, it does not say
        _count(counts, ACCEPTED, 1)
        _count(counts, UNCERTAIN, n - 1)
        return
    if body == b"0":
        _rejected(counts, PLAIN_ZERO, n, request=True)
        return
    if body is not None and body[-1:] == b")" and b"(" in body:
        body = body[body.index(b"(") + 1:-1]        # JSONP: cb(<answer>)
        if body in (b"0", b"1"):
            tally(counts, status, body, n, strict)
            return
    doc = _json(body)
    if strict and isinstance(doc, dict) and "code" in doc:
        _strict(counts, doc, n)
    elif isinstance(doc, dict) and "status" in doc:
        _verbose(counts, status, doc, n)
    elif status >= 400:
        _rejected(counts, "status %d" % status, n, request=True)
    else:
        _count(counts, UNCERTAIN, n)                  # a pixel, a redirect, an empty 204


def _json(body):
    if not body or body[:1] != b"{":
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


def _rejected(counts, reason, n, request=False):
    if request:
        _count(counts, "refused:" + reason, 1)
    _count(counts, "rejected:" + reason, n)


def _verbose(counts, status, doc, n):
    error = doc.get("error")
    if status >= 400 or not isinstance(error, (str, type(None))):
        _rejected(counts, reason_of(str(error)) if error else "status %d" % status, n, True)
    elif doc.get("status") == 1:
        if error is None:
            _count(counts, ACCEPTED, n)
        else:   # partly rejected: the first rejection is named, the others are not
            _count(counts, ACCEPTED, 1)
            _rejected(counts, reason_of(error), 1)
            _count(counts, UNCERTAIN, max(n - 2, 0))
    elif error and _RECORD_PREFIX.match(error):
        _rejected(counts, reason_of(error), n)       # every record refused, the first named
    else:
        _rejected(counts, reason_of(error) if error else PLAIN_ZERO, n, request=True)


def _strict(counts, doc, n):
    imported = doc.get("num_records_imported")
    failed = doc.get("failed_records")
    if not isinstance(imported, int):
        # Refused as a whole: bad credentials, undecodable data, too large...
        _rejected(counts, reason_of(str(doc.get("error", ""))), n, request=True)
        return
    _count(counts, ACCEPTED, imported)
    failed = failed if isinstance(failed, list) else []
    for record in failed:
        message = record.get("message") if isinstance(record, dict) else None
        _rejected(counts, reason_of(message) if isinstance(message, str) else UNRECOGNISED, 1)
    _count(counts, UNCERTAIN, max(n - imported - len(failed), 0))


def summarize(counts, threshold):
    """The report's `records` section from merged counts; `threshold` is the largest
    share of rejected records that still passes."""
    rejected = {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("rejected:")}
    refused = {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("refused:")}
    total_rejected = sum(rejected.values())
    answered = counts.get(ACCEPTED, 0) + total_rejected + counts.get(UNCERTAIN, 0)
    share = total_rejected / answered if answered else 0.0
    return {"sent": answered + counts.get(FAILED, 0), ACCEPTED: counts.get(ACCEPTED, 0),
            REJECTED: total_rejected, UNCERTAIN: counts.get(UNCERTAIN, 0),
            FAILED: counts.get(FAILED, 0), "rejected_share": round(share, 4),
            "rejected_by_reason": dict(sorted(rejected.items(), key=lambda kv: -kv[1])),
            "refused_requests_by_reason": dict(sorted(refused.items(), key=lambda kv: -kv[1])),
            "threshold": threshold, "over_threshold": share > threshold}
