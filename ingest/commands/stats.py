"""`ingest stats`: queue depths, totals and rates per Kestrel server.

What it must not do: fail when some servers are down (they are shown as DOWN; the exit
code is 1 only when every server is), or import eventlet (a plain blocking program).
"""
import json
import sys
import time

from ingest.kestrel.client import Client

RATE_INTERVAL_S = 1.0
QUEUE_FIELDS = ("items", "total_items", "open_transactions", "bytes")


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
