"""What the app reads from a WSGI request: the endpoint, the body (decompressed), the
client's address and its credentials.  Plain Python on a WSGI environ: no eventlet.

What it must not do: trust a header it was not told to trust (X-Forwarded-For only from
trusted proxies), allocate beyond the body limit (decompression stops at it), or echo
input into an error (the catalogue in ingest/errors.py words every refusal).
"""
import base64
import binascii
import ipaddress
import zlib

from ingest.errors import IngestError

ENDPOINTS = frozenset(("track", "engage", "groups", "import"))
TRUE = ("1", "true")
# Keys a WSGI server puts in environ besides the HTTP_* headers (eventlet sets about 24):
# header lines are only counted when environ is bigger than this plus the limit.
ENVIRON_BASE_KEYS = 20


def endpoint_of(path):
    """`/track`, `/track/`, `/prefix/track` -> 'track'; None for anything else."""
    trimmed = path.rstrip("/")
    name = trimmed[trimmed.rfind("/") + 1:]
    return name if name in ENDPOINTS else None


def content_length(environ):
    """The declared body size (0 when absent; read_body answers a bad one with 400)."""
    try:
        return max(int(environ.get("CONTENT_LENGTH") or 0), 0)
    except ValueError:
        return 0


def header_count(environ):
    return sum(1 for key in environ if key.startswith("HTTP_")) + \
        ("CONTENT_TYPE" in environ) + ("CONTENT_LENGTH" in environ)


def too_many_headers(environ, limit):
    # PERF: len(environ) is O(1); headers are only counted when it is suspicious.
    return len(environ) > limit + ENVIRON_BASE_KEYS and header_count(environ) > limit


def read_body(environ, max_body):
    """The whole body, decompressed per Content-Encoding; at most `max_body` bytes."""
    length = environ.get("CONTENT_LENGTH")
    stream = environ["wsgi.input"]
    try:
        if length:
            n = int(length)
            if n > max_body:
                raise IngestError("body_too_large", limit=max_body)
            body = stream.read(n) if n else b""
            if len(body) < n:
                raise IngestError("short_body")
        elif environ.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked":
            body = stream.read(max_body + 1)
            if len(body) > max_body:
                raise IngestError("body_too_large", limit=max_body)
        else:
            return b""
    except (ValueError, OSError):
        # A bad chunk header, a body cut short, or a client silent past the read
        # timeout: the server raises from the input stream.
        raise IngestError("bad_body") from None
    encoding = environ.get("HTTP_CONTENT_ENCODING", "").strip().lower()
    if encoding and encoding != "identity":
        body = decompress(body, encoding, max_body)
    return body


def decompress(body, encoding, limit):
    """gzip/x-gzip/deflate -> bytes, refusing more than `limit` bytes of output."""
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise IngestError("unsupported_encoding")
    wbits = 16 + zlib.MAX_WBITS if encoding != "deflate" else zlib.MAX_WBITS
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
        if len(out) > limit or inflater.unconsumed_tail:
            raise IngestError("body_too_large", "decompressed", limit=limit)
        if not inflater.eof:
            raise IngestError("invalid_gzip", "truncated")
    except zlib.error:
        raise IngestError("invalid_gzip") from None
    return out


def basic_secret(header):
    """The secret in an `Authorization: Basic` header: the user when the password is empty
    (API secret), else the password (service account); None when absent or malformed."""
    if not header or header[:6].lower() != "basic ":
        return None
    try:
        user, _, password = base64.b64decode(header[6:].strip(), validate=True) \
            .decode("utf-8").partition(":")
    except (binascii.Error, ValueError):
        return None
    return (password or user) or None


def proven_secret(environ, params, table):
    """The configured secret this request proves, from Basic auth or `api_key`.

    The Python SDK sends both (Basic with the API secret, api_key with the project's
    API key), so either may be the one that matches."""
    for secret in (basic_secret(environ.get("HTTP_AUTHORIZATION")), params.get("api_key")):
        if secret and table.secret_matches(secret):
            return secret
    raise IngestError("invalid_credentials")


class ClientIP:
    """Client address: left-most X-Forwarded-For when the peer is a trusted proxy."""

    def __init__(self, trusted_networks):
        self.networks = tuple(trusted_networks)
        self._cache = {}

    def trusted(self, peer):
        hit = self._cache.get(peer)
        if hit is None:
            try:
                address = ipaddress.ip_address(peer)
                hit = any(address in net for net in self.networks)
            except ValueError:
                hit = False
            if len(self._cache) > 4096:   # bounded: peers behind nginx are few
                self._cache.clear()
            self._cache[peer] = hit
        return hit

    def __call__(self, environ):
        peer = environ.get("REMOTE_ADDR") or ""
        forwarded = environ.get("HTTP_X_FORWARDED_FOR")
        if forwarded and self.trusted(peer):
            first = forwarded.split(",", 1)[0].strip()
            try:
                return str(ipaddress.ip_address(first))
            except ValueError:
                return peer
        return peer
