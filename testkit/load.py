"""A small load driver for the no-loss tests and the spool benchmark.

N native threads each keep one keep-alive HTTP connection (http.client) to a worker and
send /track requests whose events carry unique `$insert_id`s, bounded by a request count
and a duration.  For every request it records the outcome: acknowledged (200 with body
`1`), refused (503, with its Retry-After), connection failure, or anything else.  It never
retries: a request that was not acknowledged is simply not counted as acknowledged, which
is exactly what a client may rely on.

It must only talk to the loopback address it is given, and it must not decide what
"lost" means: the tests compare its acknowledged set with what landed on the queue.
"""
import http.client
import threading
import time

from testkit.payloads import b64_json

TOKEN = "no-loss-token"
REFUSALS_KEPT = 10


def track_query(insert_ids, event="load", pad=0):
    """The query string of a GET /track carrying one event per insert_id (each with a
    `pad` property of `pad` characters when asked, to make records bigger)."""
    records = [{"event": event, "properties": {"token": TOKEN, "$insert_id": iid}}
               for iid in insert_ids]
    if pad:
        for r in records:
            r["properties"]["pad"] = "x" * pad
    return "data=" + b64_json(records[0] if len(records) == 1 else records)


def track_body(insert_ids, event="load", pad=0):
    """A form-encoded POST /track body carrying one event per insert_id."""
    return track_query(insert_ids, event, pad).encode("ascii")


class Result:
    """Outcomes of one run, merged from every sender thread (under a lock)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.acked = []            # insert_ids answered `1`
        self.sent_ids = []         # insert_ids of every request attempted
        self.statuses = {}         # status (or 'conn-error') -> count
        self.retry_after = []      # Retry-After values seen on 503
        self.refusals = []         # the first REFUSALS_KEPT 503s: (seconds in, body)
        self.malformed = []        # answers that were neither a clean 200/503 nor a refusal
        self.outcome = {}          # insert_id -> (status, exception name for conn-error)
        self.requests = 0
        self.started = self.finished = None

    def record(self, ids, status, body, retry_after):
        with self.lock:
            self.requests += 1
            self.sent_ids.extend(ids)
            outcome = (status, body if status == "conn-error" else None)
            for iid in ids:
                self.outcome[iid] = outcome
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if status == 200 and body == b"1":
                self.acked.extend(ids)
            elif status == 503:
                self.retry_after.append(retry_after)
                if len(self.refusals) < REFUSALS_KEPT:
                    since = time.monotonic() - self.started if self.started else 0.0
                    self.refusals.append((round(since, 1), body[:120]))
            elif status != "conn-error":
                self.malformed.append((status, body[:200] if isinstance(body, bytes) else body))

    def count(self, status):
        return self.statuses.get(status, 0)

    @property
    def acked_count(self):
        return len(self.acked)

    def events_per_s(self):
        elapsed = (self.finished or time.monotonic()) - self.started
        return len(self.acked) / elapsed if elapsed > 0 else 0.0

    def summary(self):
        text = "requests=%d acked=%d statuses=%s" % (
            self.requests, len(self.acked), dict(sorted(self.statuses.items(), key=str)))
        if self.refusals:
            text += " first 503s (s, body): %s" % self.refusals
        return text


class Load:
    """Send /track requests from `threads` threads until `max_requests` or `duration_s`.

    `batch` events per request; batch > 1 uses a form POST.  Each thread names its
    insert_ids `<prefix>-<thread>-<n>` so ids are unique across threads and runs.
    `stop()` ends it early; `wait()` joins the threads.
    """

    def __init__(self, host, port, threads=4, max_requests=1000, duration_s=10.0, batch=1,
                 prefix="L", timeout_s=10.0, pace_s=0.0, error_pause_s=0.02,
                 pad=0):
        self.host, self.port = host, port
        self.threads = threads
        self.max_requests = max_requests
        self.duration_s = duration_s
        self.batch = batch
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.pace_s = pace_s
        self.error_pause_s = error_pause_s
        self.pad = pad
        self.result = Result()
        self._stop = threading.Event()
        self._budget = threading.Semaphore(max_requests)
        self._threads = []

    def start(self):
        self.result.started = time.monotonic()
        self._deadline = self.result.started + self.duration_s
        for i in range(self.threads):
            t = threading.Thread(target=self._run, args=(i,), name="load-%d" % i, daemon=True)
            self._threads.append(t)
            t.start()
        return self

    def stop(self):
        self._stop.set()
        return self.wait()

    def wait(self, timeout=None):
        limit = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if limit is None else max(0.0, limit - time.monotonic()))
        if self.result.finished is None:
            self.result.finished = time.monotonic()
        return self.result

    def run(self):
        return self.start().wait()

    def _more(self):
        if self._stop.is_set() or time.monotonic() >= self._deadline:
            return False
        return self._budget.acquire(blocking=False)

    def _run(self, index):
        conn, n = None, 0
        while self._more():
            ids = ["%s-%d-%d" % (self.prefix, index, n + k) for k in range(self.batch)]
            n += self.batch
            if conn is None:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
            try:
                status, body, retry_after, keep = self._send(conn, ids)
            except (http.client.IncompleteRead, http.client.LineTooLong) as exc:
                # An answer that started and was cut off: never acceptable from a worker.
                conn.close()
                conn = None
                self.result.record(ids, "truncated", repr(exc), None)
                continue
            except (OSError, http.client.HTTPException) as exc:
                # Refused, reset or closed before any answer: not acknowledged, not retried.
                conn.close()
                conn = None
                self.result.record(ids, "conn-error", type(exc).__name__, None)
                # A client's back-off, so a dead worker does not eat the request budget
                # in a tight loop of refused connections.
                self._stop.wait(self.error_pause_s)
                continue
            self.result.record(ids, status, body, retry_after)
            if not keep:
                conn.close()
                conn = None
            if self.pace_s:
                self._stop.wait(self.pace_s)
        if conn is not None:
            conn.close()

    def _send(self, conn, ids):
        if self.batch == 1:
            conn.request("GET", "/track?" + track_query(ids, pad=self.pad))
        else:
            conn.request("POST", "/track", body=track_body(ids, pad=self.pad),
                         headers={"Content-Type": "application/x-www-form-urlencoded"})
        resp = conn.getresponse()
        body = resp.read()
        length = resp.getheader("Content-Length")
        if length is not None and int(length) != len(body):
            raise http.client.IncompleteRead(body)
        return resp.status, body, resp.getheader("Retry-After"), not resp.will_close


def landed_ids(records):
    """insert_ids of queue records (parsed JSON), in queue order."""
    return [r.get("properties", {}).get("$insert_id") for r in records]
