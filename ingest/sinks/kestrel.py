"""The sink that writes to a Kestrel cluster through ingest.kestrel.Client.

What it must not do: report a batch as taken unless every item was STORED (the client
raises otherwise), or hide which items were stored (they are never sent twice).
"""
from ingest.kestrel.errors import KestrelError, KestrelUnavailable
from ingest.sinks import SinkUnavailable


class KestrelSink:
    """Writes each batch to a Kestrel cluster with one pipelined put_many."""

    def __init__(self, client):
        self.client = client

    def put(self, pairs):
        try:
            self.client.put_many(pairs)
        except KestrelError as exc:
            # `remaining`: the pairs known not stored (None: assume none was).
            refused = isinstance(exc, KestrelUnavailable) and exc.refused
            raise SinkUnavailable("no Kestrel server stored the records: %s" % exc,
                                  remaining=exc.remaining, refused=refused) from None

    def ready(self):
        """Ready when some Kestrel server answers `version` now (a live check, not a guess)."""
        try:
            self.client.version()
        except (KestrelError, OSError) as exc:
            return False, "no Kestrel server answers: %s" % exc
        return True, "kestrel"
