"""The errors of the Kestrel client, with everything a caller needs as constructor fields.

What it is for: one family under KestrelError so callers catch one type, and the state a
failure carries (which reply lines arrived, which items were never stored) passed in
when the error is raised, so no code has to guess with getattr.

    KestrelError                    any failure;  .remaining: (queue, data) pairs of a
    |                               write known NOT stored, or None when not known
    +-- InvalidQueueName            also a ValueError: refused before any I/O
    +-- KestrelConnectionError      connect/send/recv failed or the server closed;
    |   |                           .partial: the complete reply lines read before that
    |   +-- KestrelTimeout          no (complete) reply in time
    +-- KestrelProtocolError        a reply this client cannot parse
    +-- KestrelServerError          ERROR / CLIENT_ERROR / SERVER_ERROR;  .line
    +-- KestrelUnavailable          no server took the items;  .remaining is always a list,
                                    .refused: every server answered NOT_STORED

What it must not do: import sockets or anything else; these are plain values.
"""


class KestrelError(Exception):
    """Any failure reported by the Kestrel client.

    `remaining`: for a failed write, the (queue, data) pairs that were NOT stored (the
    caller's own pair objects, in order); None when that is not known or not a write.
    """

    def __init__(self, message="", remaining=None):
        super().__init__(message)
        self.remaining = remaining


class InvalidQueueName(KestrelError, ValueError):
    """The queue name would be refused by a Kestrel server (or breaks the framing)."""


class KestrelConnectionError(KestrelError):
    """Connecting, sending or receiving failed, or the server closed the connection.

    `partial`: the complete reply lines received before the failure (for a pipelined
    batch of `set`s, the replies of its first items), empty when none.
    """

    def __init__(self, message, partial=(), remaining=None):
        super().__init__(message, remaining)
        self.partial = partial

    def with_remaining(self, remaining):
        """The same failure (same type and message), now knowing the pairs not stored."""
        return type(self)(str(self), partial=self.partial, remaining=remaining)


class KestrelTimeout(KestrelConnectionError):
    """No reply within the read timeout (the server may still act on the request)."""


class KestrelProtocolError(KestrelError):
    """The server sent something this client cannot parse."""


class KestrelServerError(KestrelError):
    """The server answered ERROR, CLIENT_ERROR or SERVER_ERROR (`line`, decoded)."""

    def __init__(self, line, remaining=None):
        super().__init__(line, remaining)
        self.line = line

    @property
    def server_side(self):
        """SERVER_ERROR means the server refuses service now (read-only, quiescent...)."""
        return self.line.startswith("SERVER_ERROR")


class KestrelUnavailable(KestrelError):
    """No server took the items.  `remaining` lists the (queue, data) pairs never STORED;
    `refused` is True when every server of the cluster was asked and answered NOT_STORED
    for each of them (a refusal, not an outage)."""

    def __init__(self, message, remaining=(), refused=False):
        super().__init__(message, list(remaining))
        self.refused = refused
