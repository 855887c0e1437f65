"""`ingest stats`: every Kestrel server of a cluster: whether it answers, its depth, totals
and rates, then one summary line.

What it is for: one look at a cluster from any machine.  Per server: whether it answers
(and why not), the items it holds (per queue and in all: its depth), items ever added and
added per second.  Every server is asked at the same time, each within `timeout_ms`, so a
host cut off the network or hung costs that long once, not once per host.

What it must not do: fail or stall when some servers are down (they are shown as DOWN,
with the reason); the exit code says how many answered: 0 all, 3 some, 1 none.  Or
import eventlet (a plain blocking program).
"""
import json
import sys
import threading
import time

from ingest.kestrel.client import Client

RATE_INTERVAL_S = 1.0
TIMEOUT_MS = 1000
QUEUE_FIELDS = ("items", "total_items", "open_transactions", "bytes")
EXIT_ALL_ANSWER, EXIT_NONE_ANSWERS, EXIT_SOME_DOWN = 0, 1, 3


def sample(servers, timeout_ms=TIMEOUT_MS, clock=time.monotonic):
    """(time, {address: stats or None}, {address: why not}): every server asked at once
    over its own connection, each given `timeout_ms` to connect and as long to answer."""
    slots = [None] * len(servers)

    def ask(i, address):
        errors = {}
        client = Client([address], connect_timeout_ms=timeout_ms, timeout_ms=timeout_ms,
                        retry_ms=0)
        try:
            (value,) = client.stats(errors).values()   # keyed by the client's spelling
            slots[i] = (value, next(iter(errors.values()), None))
        finally:
            client.close()

    threads = [threading.Thread(target=ask, args=(i, a), daemon=True)
               for i, a in enumerate(servers)]
    for t in threads:
        t.start()
    # A server trickling its reply could outlast the per-recv timeouts: this bounds it.
    deadline = clock() + 2 * timeout_ms / 1000.0 + 0.5
    for t in threads:
        t.join(max(0.0, deadline - clock()))
    stats, errors = {}, {}
    for address, slot in zip(servers, slots):
        stats[address], why = slot if slot is not None else (
            None, "no answer within %d ms" % (2 * timeout_ms))
        if why:
            errors[address] = why
    return clock(), stats, errors


def summarise(first, second):
    """Two (time, {address: stats or None}) samples -> {address: summary or None}.

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
    depth = sum(q["items"] for q in queues.values() if isinstance(q["items"], int))
    return {"up": True, "version": server.get("version"), "items": depth,
            "total_items": total, "rate": _rate(total, old_total, span), "queues": queues}


def overview(summary):
    """How many servers answered, which did not, and the items the answering ones hold."""
    down = [a for a, s in summary.items() if s is None]
    return {"servers": len(summary), "answering": len(summary) - len(down), "down": down,
            "items": sum(s["items"] for s in summary.values() if s is not None)}


def summary_line(summary):
    o = overview(summary)
    servers = "%d server%s" % (o["servers"], "" if o["servers"] == 1 else "s")
    if not o["answering"]:
        return "%s: none answers" % servers
    if not o["down"]:
        return "%s: all answer; %d items queued" % (servers, o["items"])
    return "%s: %d answer, %d DOWN (%s); %d items queued on those that answer" % (
        servers, o["answering"], len(o["down"]), ", ".join(o["down"]), o["items"])


def exit_code(summary):
    o = overview(summary)
    if not o["down"]:
        return EXIT_ALL_ANSWER
    return EXIT_SOME_DOWN if o["answering"] else EXIT_NONE_ANSWERS


def format_table(summary, errors=None):
    """A readable table: one line per (server, queue), DOWN for silent servers; then the
    summary line and why each DOWN server did not answer."""
    header = ("server", "queue", "items", "total_items", "open", "bytes", "items/s")
    rows = [header]
    for address, s in summary.items():
        if s is None:
            rows.append((address, "DOWN", "-", "-", "-", "-", "-"))
            continue
        rows.append((address, "(all)", _cell(s["items"]), _cell(s["total_items"]), "", "",
                     _cell(s["rate"])))
        for name, q in s["queues"].items():
            rows.append(("", name) + tuple(_cell(q[f]) for f in QUEUE_FIELDS)
                        + (_cell(q["rate"]),))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for r in rows:
        cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1])]
        cells += [c.rjust(w) for c, w in zip(r[2:], widths[2:])]
        lines.append("  ".join(cells).rstrip())
    lines.append(summary_line(summary))
    for address in overview(summary)["down"]:
        why = (errors or {}).get(address, "no answer")
        if why.startswith(address + ": "):      # the client's errors name the server
            why = why[len(address) + 2:]
        lines.append("DOWN %s: %s" % (address, why))
    return "\n".join(lines) + "\n"


def _cell(value):
    return "-" if value is None else str(value)


def stats(servers, as_json=False, out=None, interval_s=RATE_INTERVAL_S,
          timeout_ms=TIMEOUT_MS):
    """Print the cluster's servers and queues; the exit code: 0 when every server
    answered, 3 when some did not, 1 when none did."""
    out = out or sys.stdout
    t1, first, errors = sample(servers, timeout_ms)
    answering = [a for a in servers if first[a] is not None]
    second = {}
    t2 = t1
    if answering:
        time.sleep(interval_s)  # the rate is measured over this interval
        t2, second, later = sample(answering, timeout_ms)
        errors.update(later)
    summary = summarise((t1, first), (t2, {a: second.get(a) for a in servers}))
    if as_json:
        out.write(json.dumps({"interval_s": interval_s, "servers": summary,
                              "summary": overview(summary), "errors": errors},
                             sort_keys=True) + "\n")
    else:
        out.write(format_table(summary, errors))
    out.flush()
    return exit_code(summary)
