"""Operator commands over a Kestrel cluster: `ingest consume` and `ingest stats`.

What it is for: looking at and draining queues from a shell.  `consume` reliable-reads
items and prints one JSON line per item, confirming each read only after the line has
been written and flushed; `stats` prints depths, totals and rates per server.

What it must not do: lose an item (a read is closed only after its line is out, and
aborted when writing fails), sleep-poll a queue (waits are Kestrel's blocking `/t=`),
or import eventlet (these commands are plain blocking programs).
"""
import json
import sys
import time

from ingest.kestrel.client import Client
from ingest.kestrel.errors import KestrelError

RATE_INTERVAL_S = 1.0
QUEUE_FIELDS = ("items", "total_items", "open_transactions", "bytes")


# ---- consume ------------------------------------------------------------------------------

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
            err=None):
    """Print up to `max_items` items of `queue`; stop after `timeout_ms` without one.

    Returns the exit code: 0 when it stopped normally, 1 when the cluster failed or
    standard output could not be written (the unconfirmed item is then aborted).
    """
    out = out or sys.stdout
    err = err or sys.stderr
    client = Client(servers)
    try:
        if peek:
            return _peek(client, queue, timeout_ms, out, err)
        return _drain(client, queue, max_items, timeout_ms, out, err)
    finally:
        client.close()


def _peek(client, queue, timeout_ms, out, err):
    try:
        data = client.peek(queue, timeout=timeout_ms)
    except KestrelError as e:
        err.write("ingest consume: %s\n" % e)
        return 1
    if data is not None:
        _emit(out, data)
    return 0


def _drain(client, queue, max_items, timeout_ms, out, err):
    count = 0
    try:
        while max_items is None or count < max_items:
            # next() confirms the previous item (already printed) and opens the next one.
            data = client.next(queue, timeout=timeout_ms)
            if data is None:
                return 0
            try:
                _emit(out, data)
            except (OSError, ValueError) as e:  # closed or broken stdout
                client.abort(queue)
                err.write("ingest consume: cannot write item, returned to queue: %s\n" % e)
                return 1
            count += 1
        client.finish(queue)
    except KestrelError as e:
        err.write("ingest consume: %s\n" % e)
        return 1
    return 0


# ---- stats --------------------------------------------------------------------------------

def sample(client, clock=time.monotonic):
    return clock(), client.stats()


def summarise(first, second):
    """Two (time, client.stats()) samples -> {address: summary or None when down}.

    Rates are the growth of `total_items` (items ever added) between the two samples,
    divided by the time between them: items/s added, per queue and per server.
    """
    (t1, before), (t2, after) = first, second
    span = max(t2 - t1, 1e-6)
    out = {}
    for address, now in after.items():
        if now is None:
            out[address] = None
            continue
        # A server that was down at the first sample has no rate yet.
        out[address] = _summarise_server(before.get(address), now, span)
    return out


def _rate(new, old, span):
    if isinstance(new, (int, float)) and isinstance(old, (int, float)):
        return round(max(0, new - old) / span, 1)
    return None


def _summarise_server(then, now, span):
    queues = {}
    for name, stats in sorted(now["queues"].items()):
        row = {f: stats.get(f) for f in QUEUE_FIELDS}
        # A queue created between the samples started from 0 items.
        old = then["queues"].get(name, {}).get("total_items", 0) if then else None
        row["rate"] = _rate(stats.get("total_items"), old, span)
        queues[name] = row
    server = now["server"]
    total = server.get("total_items")
    old_total = then["server"].get("total_items") if then else None
    return {"up": True, "version": server.get("version"), "total_items": total,
            "rate": _rate(total, old_total, span), "queues": queues}


def format_table(summary):
    """A readable table: one line per (server, queue), `down` for silent servers."""
    header = ("server", "queue", "items", "total_items", "open", "bytes", "items/s")
    rows = [header]
    for address, s in summary.items():
        if s is None:
            rows.append((address, "DOWN", "-", "-", "-", "-", "-"))
            continue
        rows.append((address, "(all)", "", _cell(s["total_items"]), "", "", _cell(s["rate"])))
        for name, q in s["queues"].items():
            rows.append(("", name) + tuple(_cell(q[f]) for f in QUEUE_FIELDS)
                        + (_cell(q["rate"]),))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for r in rows:
        cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1])]
        cells += [c.rjust(w) for c, w in zip(r[2:], widths[2:])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def _cell(value):
    return "-" if value is None else str(value)


def stats(servers, as_json=False, out=None, interval_s=RATE_INTERVAL_S):
    """Print the cluster's queues; exit code 1 only when every server is down."""
    out = out or sys.stdout
    client = Client(servers)
    try:
        first = sample(client)
        if any(v is not None for v in first[1].values()):
            time.sleep(interval_s)  # the rate is measured over this interval
        summary = summarise(first, sample(client))
    finally:
        client.close()
    if as_json:
        out.write(json.dumps({"interval_s": interval_s, "servers": summary}, sort_keys=True)
                  + "\n")
    else:
        out.write(format_table(summary))
    out.flush()
    return 0 if any(v is not None for v in summary.values()) else 1
