"""BatchingSink: many concurrent requests share one write to the inner sink.

What it must not do: leave a request waiting when the inner sink fails (every waiter is
woken with its share of the outcome), or acknowledge a pair the inner sink did not take.
Uses `threading` only; under eventlet's monkey patching its threads are green.
"""
import collections
import threading

from ingest.sinks import SinkUnavailable


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

    A request that finds nothing queued and a writer free makes its write itself, in
    its own thread, counted as one of the `writers` writes in flight: it saves two
    thread switches and a wake-up on either side, and requests arriving meanwhile queue
    for the writer threads as before.
    """

    def __init__(self, inner, writers=1, max_batch_records=5000, event_factory=None,
                 lock=None):
        self.inner = inner
        self.max_batch_records = max_batch_records
        # Anything with set() and wait(); the server passes a cheaper green one, whose
        # set_all() wakes a whole write's requests at once.
        self._event = event_factory or threading.Event
        self._set_all = getattr(self._event, "set_all", None)
        # `lock`: the server passes an operating-system lock (PERF: a green one is about
        # ten Python calls per request to take and give back).  Nothing here waits or
        # yields while holding it; Condition.wait gives it up before waiting.
        self._lock = lock if lock is not None else threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._idle_writers = 0     # writer threads waiting in _take: only they need notify
        self._queue = collections.deque()
        self._writers = writers
        self._writing = 0          # writes in flight: the writer threads' and direct ones
        self._stopping = False
        self.batches = 0
        self.records = 0
        self._threads = [threading.Thread(target=self._run, name="sink-writer-%d" % i, daemon=True)
                         for i in range(writers)]
        for t in self._threads:
            t.start()

    def put(self, pairs):
        with self._lock:
            if self._stopping:
                # The writer threads end once the queue is empty: a request queued now
                # would wait for ever.
                raise SinkUnavailable("the sink is closed")
            direct = not self._queue and self._writing < self._writers
            if direct:
                self._writing += 1
            else:
                waiter = _Waiter(pairs, self._event())
                self._queue.append(waiter)
                if self._idle_writers:
                    self._cond.notify()
        if direct:
            error = _share_of(self._write(pairs), pairs)
            if error is not None:
                raise error
            return
        waiter.done.wait()
        if waiter.error is not None:
            raise waiter.error

    def _write(self, pairs):
        """One inner put of `pairs`, counted in `_writing` (taken by the caller); the
        error it ended with, or None."""
        error = None
        try:
            self.inner.put(pairs)
        except SinkUnavailable as exc:
            error = exc
        except Exception as exc:  # never leave a request waiting forever
            error = SinkUnavailable("sink failed: %s" % exc)
        finally:
            with self._lock:
                self._writing -= 1
                self.batches += 1
                self.records += len(pairs)
                if self._queue and self._idle_writers:
                    self._cond.notify()     # a writer thread may take what queued
        return error

    def _take(self):
        with self._cond:
            while not self._queue or self._writing >= self._writers:
                if self._stopping and not self._queue:
                    return None
                self._idle_writers += 1
                try:
                    self._cond.wait()
                finally:
                    self._idle_writers -= 1
            taken, count = [], 0
            while self._queue and (not taken or count + len(self._queue[0].pairs)
                                   <= self.max_batch_records):
                waiter = self._queue.popleft()
                taken.append(waiter)
                count += len(waiter.pairs)
            self._writing += 1
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
            error = self._write(pairs)
            if error is not None:
                for waiter in taken:
                    waiter.error = _share_of(error, waiter.pairs)
            if self._set_all is not None:
                self._set_all([waiter.done for waiter in taken])
            else:
                for waiter in taken:
                    waiter.done.set()

    def ready(self):
        return self.inner.ready()

    def close(self):
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
