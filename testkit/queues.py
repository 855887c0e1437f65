"""Read back what landed on a Kestrel queue, for integration tests.

Every wait here is a blocking `get <queue>/t=<ms>` against the real queue server, bounded
by an overall deadline; nothing sleeps.  Items are decoded as the UTF-8 compact JSON the
worker writes.  This module only reads (and so removes) items; it must not enqueue
anything or reach servers other than the ones a test started.
"""
import json
import time

from ingest.kestrel import Client

# One blocking get waits at most this long, so a deadline is noticed promptly and the
# client's own socket timeout (2 s) is never the one that fires.
MAX_WAIT_MS = 500


def _decode(item, queue, index):
    try:
        return json.loads(item.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise AssertionError("item %d on queue %r is not UTF-8 JSON (%s): %r"
                             % (index, queue, e, item[:200]))


def read_all(address, queue, expected_count, timeout_s=10.0, settle_ms=200):
    """Exactly `expected_count` records from `queue`, in queue order.

    Fails if fewer arrive before `timeout_s`, or if more than `expected_count` are there
    (one extra blocking get of `settle_ms` checks that nothing else landed; pass
    settle_ms=0 to skip it).
    """
    deadline = time.monotonic() + timeout_s
    records = []
    with Client([address]) as client:
        while len(records) < expected_count:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                raise AssertionError(
                    "queue %r on %s: %d of %d records after %.1fs; got: %s"
                    % (queue, address, len(records), expected_count, timeout_s,
                       json.dumps(records, ensure_ascii=False)[:2000]))
            item = client.get(queue, timeout=max(1, min(MAX_WAIT_MS, left_ms)))
            if item is not None:
                records.append(_decode(item, queue, len(records)))
        if settle_ms:
            extra = client.get(queue, timeout=settle_ms)
            if extra is not None:
                raise AssertionError("queue %r on %s: more than %d records; the next one is %r"
                                     % (queue, address, expected_count,
                                        extra.decode("utf-8", "replace")[:500]))
    return records


def read_until_empty(address, queue, idle_ms=300, timeout_s=10.0):
    """Every record on `queue` until none arrives for `idle_ms` (or `timeout_s` passes)."""
    deadline = time.monotonic() + timeout_s
    records = []
    with Client([address]) as client:
        while time.monotonic() < deadline:
            item = client.get(queue, timeout=idle_ms)
            if item is None:
                return records
            records.append(_decode(item, queue, len(records)))
    raise AssertionError("queue %r on %s still delivering after %.1fs (%d records read)"
                         % (queue, address, timeout_s, len(records)))


def assert_empty(address, queue, wait_ms=300):
    """Fail if any record shows up on `queue` within `wait_ms`."""
    with Client([address]) as client:
        item = client.get(queue, timeout=wait_ms)
    if item is not None:
        raise AssertionError("queue %r on %s should be empty, found %r"
                             % (queue, address, item.decode("utf-8", "replace")[:500]))


def pop_processing_time(properties, start_s, end_s, slack_s=2.0):
    """Remove `mp_processing_time_ms` from an event's properties and check it.

    The worker stamps arrival time as integer milliseconds; it must fall between the
    moments the test started and finished sending (with `slack_s` for clock rounding).
    """
    assert "mp_processing_time_ms" in properties, "no mp_processing_time_ms in %r" % properties
    value = properties.pop("mp_processing_time_ms")
    assert type(value) is int, "mp_processing_time_ms is %r, not an int" % (value,)
    low, high = (start_s - slack_s) * 1000, (end_s + slack_s) * 1000
    assert low <= value <= high, "mp_processing_time_ms %d outside [%d, %d]" % (value, low, high)
    return value


def pop_filled_time(properties, start_s, end_s, slack_s=2.0):
    """Remove a `time` the worker filled in (arrival, float seconds) and check it."""
    assert "time" in properties, "worker did not fill properties.time: %r" % properties
    value = properties.pop("time")
    assert isinstance(value, (int, float)) and not isinstance(value, bool), value
    assert start_s - slack_s <= value <= end_s + slack_s, \
        "filled time %r outside [%r, %r]" % (value, start_s, end_s)
    return value


def queue_stats(address, queue):
    """One queue's stats on one server ({} when the server does not know the queue)."""
    with Client([address]) as client:
        return client.stats()[address]["queues"].get(queue, {})
