"""Kestrel memcache-protocol pieces shared by the client and the bundled server.

Facts (shared/docs/kestrel-protocol.md): commands are case-insensitive, queue names are
case-sensitive, names containing '.', '/' or '~' are refused, `set` carries
`<queue> <flags> <exptime> <bytes>` then the data and CRLF.  Pure functions, no I/O.
"""

CRLF = b"\r\n"
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


def format_set(queue, data, expiry=0):
    """The bytes of one `set` command carrying `data` (bytes) onto `queue` (str)."""
    return b"set %s 0 %d %d\r\n%s\r\n" % (queue.encode("utf-8"), expiry, len(data), data)
