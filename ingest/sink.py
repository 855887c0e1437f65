"""Where accepted records go, with the acknowledgement rule as the interface.

`sink.put(pairs)` takes a list of (queue, payload bytes) and returns only once every pair
is durably taken (STORED by Kestrel, or spooled); otherwise it raises SinkUnavailable and
the app answers 503 with Retry-After.  Fallbacks (the spool) wrap a sink; they are not
flags inside one.
"""


class SinkUnavailable(Exception):
    """No record of the batch may be acknowledged; the client should retry later.

    `remaining`: the pairs not stored, when the sink knows some were (None: assume none)."""

    def __init__(self, message="records could not be stored", retry_after_s=1, remaining=None):
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.remaining = remaining


class MemorySink:
    """An in-memory sink for unit tests and in-process benchmarks."""

    def __init__(self):
        self.items = []
        self.failing = False

    def put(self, pairs):
        if self.failing:
            raise SinkUnavailable()
        self.items.extend(pairs)

    def queue(self, name):
        return [payload for queue, payload in self.items if queue == name]

    def ready(self):
        return not self.failing, "memory sink"


class KestrelSink:
    """Writes each batch to a Kestrel cluster with one pipelined put_many."""

    def __init__(self, client):
        self.client = client

    def put(self, pairs):
        from ingest.kestrel.errors import KestrelError
        try:
            self.client.put_many(pairs)
        except KestrelError as exc:
            raise SinkUnavailable("no Kestrel server stored the records: %s" % exc,
                                  remaining=exc.remaining) from None

    def ready(self):
        """Ready when some Kestrel server answers `version` now (a live check, not a guess)."""
        from ingest.kestrel.errors import KestrelError
        try:
            self.client.version()
        except (KestrelError, OSError) as exc:
            return False, "no Kestrel server answers: %s" % exc
        return True, "kestrel"


def _share_of(error, pairs):
    """One request's part of a failed coalesced batch: the same error, with `remaining`
    narrowed to that request's pairs (the client hands back the very pair objects it was
    given, so identity maps them to their request; equal payloads may share an object)."""
    if error is None or error.remaining is None:
        return error
    unstored = {id(pair) for pair in error.remaining}
    mine = [pair for pair in pairs if id(pair) in unstored]
    if not mine:
        return None          # every record of this request was stored
    return SinkUnavailable(str(error), error.retry_after_s, mine)


class _Waiter:
    __slots__ = ("pairs", "done", "error")

    def __init__(self, pairs, event):
        self.pairs = pairs
        self.done = event
        self.error = None


class BatchingSink:
    """Coalesces the batches of many concurrent requests into one write to the inner sink.

    Each request hands its pairs to a queue and waits; `writers` writer threads (green
    threads under eventlet's monkey patching) take everything queued, make one inner
    `put`, and wake every request in it with the outcome.  A request alone is written at
    once; under load one round trip to Kestrel carries many requests' records.  When the
    inner sink fails, every request of that batch fails (and may be spooled by a wrapper):
    some records may then be stored twice, never lost (at-least-once).

    PERF: the design's "one writer per connection that batches records from many
    concurrent requests".  With 100 keep-alive connections of single-event GETs on one
    core (wrk), one writer gave 7,650-7,900 req/s and p99 20-25 ms, four writers
    6,850-7,100 req/s and p99 30 ms: fewer, larger round trips win, so one is the default.
    """

    def __init__(self, inner, writers=1, max_batch_records=5000, event_factory=None):
        import collections
        import threading
        self.inner = inner
        self.max_batch_records = max_batch_records
        # Anything with set() and wait(); the server passes a cheaper green one.
        self._event = event_factory or threading.Event
        self._cond = threading.Condition(threading.Lock())
        self._queue = collections.deque()
        self._stopping = False
        self.batches = 0
        self.records = 0
        self._threads = [threading.Thread(target=self._run, name="sink-writer-%d" % i, daemon=True)
                         for i in range(writers)]
        for t in self._threads:
            t.start()

    def put(self, pairs):
        waiter = _Waiter(pairs, self._event())
        with self._cond:
            self._queue.append(waiter)
            self._cond.notify()
        waiter.done.wait()
        if waiter.error is not None:
            raise waiter.error

    def _take(self):
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait()
            taken, count = [], 0
            while self._queue and (not taken or count + len(self._queue[0].pairs)
                                   <= self.max_batch_records):
                waiter = self._queue.popleft()
                taken.append(waiter)
                count += len(waiter.pairs)
            return taken

    def _run(self):
        while True:
            taken = self._take()
            if taken is None:
                return
            if len(taken) == 1:
                pairs = taken[0].pairs
            else:
                pairs = [pair for waiter in taken for pair in waiter.pairs]
            error = None
            try:
                self.inner.put(pairs)
            except SinkUnavailable as exc:
                error = exc
            except Exception as exc:  # never leave a request waiting forever
                error = SinkUnavailable("sink failed: %s" % exc)
            self.batches += 1
            self.records += len(pairs)
            for waiter in taken:
                waiter.error = _share_of(error, waiter.pairs)
                waiter.done.set()

    def ready(self):
        return self.inner.ready()

    def close(self):
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
