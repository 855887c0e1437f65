"""Clean record -> queue item bytes: compact JSON, UTF-8.  Pure: no I/O, no eventlet.

The record contract (docs/http-api.md): each queue item is one cleaned record as
compact JSON.  A record that cannot be written as JSON is rejected with a reason, the
others in its request go on.
"""
import json
import json.encoder

import msgspec

from ingest.errors import RecordRejected


def _encode_error(value):
    raise TypeError("not JSON serialisable: %s" % type(value).__name__)


# PERF: one pre-built encoder; compact separators, UTF-8 out.  The standard library's C
# encoder writes a typical event in ~3 us against ~7 us for simplejson's with
# ensure_ascii=False (decoding stays simplejson), and building its C encoder once instead
# of per call (as JSONEncoder.encode does) saves another ~1 us.  No circular-reference
# markers: records come from JSON text, so they cannot contain cycles.  allow_nan=False
# refuses an infinity parsed from 1e400.
if json.encoder.c_make_encoder is not None:
    _C_ENCODER = json.encoder.c_make_encoder(None, _encode_error, json.encoder.encode_basestring,
                                             None, ":", ",", False, False, False)

    def to_json(record):
        return "".join(_C_ENCODER(record, 0))
else:  # pragma: no cover - CPython always has the C encoder
    to_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


# PERF: msgspec writes a typical event in ~0.4 us against ~3 us for the C encoder above
# plus the UTF-8 encode.  Its output is the same byte for byte (same separators, same
# escapes, UTF-8, integers of any size) except for floats Python writes with an
# exponent (1e-05, 1e+16: msgspec writes 0.00001, 1e16) and non-finite floats (msgspec:
# null; here they must be refused).  A record decoded by decode's fast path has neither
# (decode._plain_float), and cleaning adds none, so `plain` records take this path.
FAST_ENCODE = msgspec.json.Encoder().encode


def encode_record(record, max_bytes, plain=False):
    """The queue item for `record`, or RecordRejected (lone surrogate, infinity, too big).

    `plain`: every float in the record is finite and written without an exponent
    (decode.loads_checked says so), so the fast encoder is exact."""
    payload = None
    if plain:
        try:
            payload = FAST_ENCODE(record)
        except Exception:    # a lone surrogate added later: the exact path decides
            payload = None
    if payload is None:
        payload = _exact(record)
    if len(payload) > max_bytes:
        raise RecordRejected("record_too_large", "record", limit=max_bytes)
    return payload


def _exact(record):
    """The reference encoding: the standard library's C encoder, then UTF-8."""
    try:
        return to_json(record).encode("utf-8")
    except UnicodeEncodeError:
        raise RecordRejected("invalid_unicode", "record") from None
    except ValueError:   # allow_nan=False: 1e400 parsed as infinity
        raise RecordRejected("invalid_number", "record") from None
