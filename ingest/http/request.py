"""What the app reads from a WSGI request: the endpoint, the body (decompressed), the
client's address and its credentials.  Plain Python on a WSGI environ: no eventlet.

What it must not do: trust a header it was not told to trust (X-Forwarded-For only from
trusted proxies), allocate beyond the body limits (decompression stops at its own cap,
and every piece is charged to the in-flight budget before the next is read), or echo
input into an error (the catalogue in ingest/errors.py words every refusal).
"""
import base64
import binascii
import ipaddress
import re
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


# Bodies are read (and inflated) this much at a time, each piece charged to the in-flight
# budget as it arrives.  PERF: a body that fits in one piece (every SDK request) is one
# read and no copy, as before.
READ_BYTES = 64 * 1024
INFLATE_BYTES = 256 * 1024


def _no_charge(_n):
    pass


def read_body(environ, max_body, max_inflated=None, charge=_no_charge):
    """The whole body, decompressed per Content-Encoding.

    At most `max_body` bytes are read and at most `max_inflated` (default: max_body)
    produced by decompression; `charge(n)` is called with the size of each piece held
    (as read, or as inflated), before the next piece is read, and may raise to refuse
    the request there (the in-flight budget).  A read that times out (the worker's
    whole-body deadline, or the per-read timeout) is `body_timeout`."""
    length = environ.get("CONTENT_LENGTH")
    encoding = environ.get("HTTP_CONTENT_ENCODING", "").strip().lower()
    inflater = None
    if encoding and encoding != "identity":
        inflater = Inflater(encoding, max_body if max_inflated is None else max_inflated)
    if length:
        n = int(length)
        if n > max_body:
            raise IngestError("body_too_large", limit=max_body)
    elif environ.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked":
        n = None
    else:
        return b""
    try:
        pieces = _read_pieces(environ["wsgi.input"], n, max_body, inflater, charge)
    except TimeoutError:
        raise IngestError("body_timeout") from None
    except (ValueError, OSError):
        # A bad chunk header, a body cut short, or a client gone: the server raises
        # from the input stream.
        raise IngestError("bad_body") from None
    if inflater is not None:
        inflater.finish()
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def _read_pieces(stream, n, max_body, inflater, charge):
    """The body as a list of pieces (inflated when `inflater`), each charged."""
    pieces, got = [], 0
    while n is None or got < n:
        chunk = stream.read(READ_BYTES if n is None else min(READ_BYTES, n - got))
        if not chunk:
            if n is not None:
                raise IngestError("short_body")
            break
        got += len(chunk)
        if got > max_body:
            raise IngestError("body_too_large", limit=max_body)
        if inflater is None:
            charge(len(chunk))
            pieces.append(chunk)
        else:
            for piece in inflater.feed(chunk):
                charge(len(piece))
                pieces.append(piece)
    return pieces or [b""]


class Inflater:
    """gzip/x-gzip/deflate, inflated a piece at a time, refusing more than `limit` bytes
    of output (so a bomb costs no more than the limit)."""

    def __init__(self, encoding, limit):
        if encoding not in ("gzip", "x-gzip", "deflate"):
            raise IngestError("unsupported_encoding")
        wbits = 16 + zlib.MAX_WBITS if encoding != "deflate" else zlib.MAX_WBITS
        self.inflater = zlib.decompressobj(wbits)
        self.limit = limit
        self.total = 0

    def feed(self, data):
        """Yield the output of `data`, INFLATE_BYTES at most at a time."""
        while data and not self.inflater.eof:
            try:
                out = self.inflater.decompress(data, INFLATE_BYTES)
            except zlib.error:
                raise IngestError("invalid_gzip") from None
            self.total += len(out)
            if self.total > self.limit:
                raise IngestError("body_too_large", "decompressed", limit=self.limit)
            data = self.inflater.unconsumed_tail
            if out:
                yield out

    def finish(self):
        if not self.inflater.eof:
            raise IngestError("invalid_gzip", "truncated")


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


# A dotted quad that ipaddress reads and writes back unchanged: four ASCII numbers of 0-255
# without leading zeros (ipaddress refuses those).
_CANONICAL_IPV4 = re.compile(r"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}"
                             r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])")


class ClientIP:
    """Client address: left-most X-Forwarded-For when the peer is a trusted proxy.

    PERF: a forwarded address that is already a canonical dotted quad (nearly all) is
    returned as it is, which is what str(ipaddress.ip_address()) gives it: the
    ipaddress round trip cost 15 us, 2.3 % of the mixed SDK log's in-process
    instructions (tests/unit/test_fast_paths.py compares the two)."""

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
            if _CANONICAL_IPV4.fullmatch(first):
                return first
            try:
                return str(ipaddress.ip_address(first))
            except ValueError:
                return peer
        return peer
