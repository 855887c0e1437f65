"""`ingest consume QUEUE`: reliable-read items and print one JSON line per item.

What it is for: looking at and draining queues from a shell, over one connection (items
in queue order) or several (`--connections N`, ingest/kestrel/consumer.py: faster, in
no particular order).  Each read is confirmed only after its line has been written and
flushed.

What it must not do: lose an item (a read is closed only after its line is out, and
aborted when writing fails), sleep-poll a queue (waits are Kestrel's blocking `/t=`),
or import eventlet (a plain blocking program).
"""
import json
import sys

from ingest.kestrel.client import Client, KestrelError
from ingest.kestrel.consumer import Consumer


def _reject_constant(name):
    raise ValueError("not JSON: %s" % name)


def item_line(data):
    """One line of JSON for an item.

    Items are normally compact JSON records and are printed unchanged; JSON spread over
    several lines is re-serialised compactly; anything else (not UTF-8, not JSON) becomes
    a JSON string of the bytes decoded as UTF-8 with U+FFFD replacements.
    """
    try:
        text = data.decode("utf-8")
        value = json.loads(text, parse_constant=_reject_constant)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return json.dumps(data.decode("utf-8", "replace"), ensure_ascii=False)
    if "\n" in text or "\r" in text or "\u2028" in text or "\u2029" in text:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text.strip()


def _emit(out, data):
    out.write(item_line(data) + "\n")
    out.flush()


def consume(queue, servers, max_items=None, timeout_ms=1000, peek=False, out=None,
            err=None, connections=1):
    """Print up to `max_items` items of `queue`; stop after `timeout_ms` without one.

    Returns the exit code: 0 when it stopped normally, 1 when the cluster failed or
    standard output could not be written (the unconfirmed items are then aborted).
    """
    out = out or sys.stdout
    err = err or sys.stderr
    if peek:
        client = Client(servers)
        try:
            return _peek(client, queue, timeout_ms, out, err)
        finally:
            client.close()
    consumer = Consumer(servers, queue, connections=connections, wait_ms=timeout_ms,
                        max_items=max_items)
    try:
        return _drain(consumer, timeout_ms, out, err)
    finally:
        consumer.close()


def _peek(client, queue, timeout_ms, out, err):
    try:
        data = client.peek(queue, timeout=timeout_ms)
    except KestrelError as e:
        err.write("ingest consume: %s\n" % e)
        return 1
    if data is not None:
        _emit(out, data)
    return 0


def _drain(consumer, timeout_ms, out, err):
    """Print every batch of items as it arrives, flush, and only then confirm it."""
    try:
        while True:
            batch = consumer.fetch(timeout_ms)
            if not batch:
                return 0
            try:
                # PERF: one write and one flush per batch (the items that arrived
                # together), not per item.
                out.write("".join([item_line(item.data) + "\n" for item in batch]))
                out.flush()
            except (OSError, ValueError) as e:  # closed or broken stdout
                consumer.abort(batch)
                err.write("ingest consume: cannot write items, returned to queue: %s\n" % e)
                return 1
            consumer.confirm(batch)
    except KestrelError as e:
        err.write("ingest consume: %s\n" % e)
        return 1
