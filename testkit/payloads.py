"""What requests carry and what workers read: JSON text, base64 in the SDKs' variants,
Basic credentials, routes files.

Pure functions over values (and one file write): no sockets, no clock, no randomness,
so a test or a generated benchmark log gets the same bytes on every run.  The variants
are parameters, not copies: a caller that needs the exact bytes an SDK sends names the
variant (compact or spaced JSON, escaped or raw non-ASCII, standard or URL-safe base64,
padded or not).  Nothing here decides whether a payload is valid; that is the server's
job and the tests' assertion.
"""
import base64
import json
import os


def compact_json(value, ensure_ascii=True):
    """JSON text without spaces, as the SDKs write it; with ensure_ascii=False non-ASCII
    characters stay as they are instead of \\u escapes."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=ensure_ascii)


def b64(data, urlsafe=False, pad=True):
    """base64 text of `data`: bytes as they are, text as UTF-8.

    Lone surrogates in text are encoded as they stand (surrogatepass), so a deliberately
    broken JSON text still reaches the server.  `urlsafe` uses '-' and '_' for '+' and
    '/'; pad=False strips the trailing '=' as some clients do.
    """
    raw = data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass")
    out = (base64.urlsafe_b64encode(raw) if urlsafe else base64.b64encode(raw)).decode("ascii")
    return out if pad else out.rstrip("=")


def b64_json(value, urlsafe=False, pad=True, compact=True, ensure_ascii=True):
    """base64 of `value` as JSON: compact (the SDKs' form) or with json.dumps's default
    ", " and ": " separators (compact=False); see b64 for urlsafe and pad."""
    text = (compact_json(value, ensure_ascii) if compact
            else json.dumps(value, ensure_ascii=ensure_ascii))
    return b64(text, urlsafe, pad)


def basic_auth(user, password=""):
    """An Authorization header value for HTTP Basic credentials `user:password`."""
    return "Basic " + b64("%s:%s" % (user, password))


def write_routes(path, table, compact=False):
    """Write a routes file (a JSON table) at `path` and return the path as a string.

    Written to a temporary name and renamed into place, so a worker reloading on SIGHUP
    never reads half a file.  compact=True leaves out the spaces (for very large tables).
    """
    path = str(path)
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        json.dump(table, fh, separators=(",", ":") if compact else None)
    os.replace(path + ".tmp", path)
    return path
