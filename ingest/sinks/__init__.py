"""Where accepted records go, with the acknowledgement rule as the interface.

`sink.put(pairs)` takes a list of (queue, payload bytes) and returns only once every pair
is durably taken (STORED by Kestrel, or spooled); otherwise it raises SinkUnavailable and
the app answers 503 with Retry-After.  `sink.ready()` -> (ok, why) feeds /ready.
Fallbacks wrap a sink; they are not flags inside one:

    kestrel.py    KestrelSink: one pipelined put_many to the Kestrel cluster
    batching.py   BatchingSink: many concurrent requests share one inner put
    spool.py      Spool: the local disk log records go to when Kestrel cannot take them
    fallback.py   SpoolingSink: the primary sink first, the spool when it fails
    frames.py     the spool's on-disk format: segment header, frames, scanning past damage
    forwarder.py  Forwarder: spooled records back to Kestrel, oldest first; dead letters
    memory.py     MemorySink: for unit tests and in-process benchmarks
"""


class SinkUnavailable(Exception):
    """No record of the batch may be acknowledged; the client should retry later.

    `remaining`: the pairs not stored, when the sink knows some were (None: assume none).
    `refused`: every server was reached and answered NOT_STORED for each of `remaining`
    (a refusal, not an outage; the forwarder's dead letters depend on telling them apart)."""

    def __init__(self, message="records could not be stored", retry_after_s=1, remaining=None,
                 refused=False):
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.remaining = remaining
        self.refused = refused
