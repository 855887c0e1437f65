"""Turn raw replay runs into report.json, report.md and PNG plots.

Input is what bench.replay.run_load returns (per-second buckets of raw latencies of
answers without error and of 5xx answers, status and error counts, what the answers said
about the records, CPU figures); output is a directory:

  report.json         figures for the server under test, `baseline` for the hello-world
                      run of the same invocation and `ratio` = target / baseline
  report.md           the same, for people; a red FAILED line on top when more records
                      were rejected than the threshold allows
  throughput.png      answers without error per second, and errors per second apart
  latency.png         p50 / p90 / p99 per second of answers without error (log scale),
                      5xx answers apart
  latency_hist.png    distribution of all latencies (log-spaced bins), errors apart

Every image is titled with the target, the connections, the mode, the date and the
commit, and keeps its legend outside the plotting area.

This module computes and draws; it never sends a request.  matplotlib runs on the Agg
backend, so it works without a display.
"""
import json
import os

import numpy as np

from bench import outcome

# A load generator process above this share of one core is probably the bottleneck.
BUSY_CORE_SHARE = 0.90
# More than this many cores' worth of CPU used by other processes disturbs the figures.
OTHER_LOAD_CORES = 0.25
# A core whose time the hypervisor gave to other machines above this share (steal) ran
# slower than on a quiet host (on this VM, a batch50 open-loop round with 9 % and 17 %
# had a p99 of 56 ms, the rounds beside it without steal 9-10 ms).
STEAL_SHARE = 0.05
PLOTS = ("throughput.png", "latency.png", "latency_hist.png")


def _ms(seconds):
    return round(float(seconds) * 1000.0, 3)


def _percentiles(values):
    if len(values) == 0:
        return {"p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    a = np.asarray(values)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"p50": _ms(p50), "p90": _ms(p90), "p99": _ms(p99), "max": _ms(a.max()),
            "mean": _ms(a.mean())}


def _series(run):
    out = []
    seconds = run["seconds"]
    for i, sec in enumerate(seconds):
        # The last bucket covers the rest of the run, including requests that were in
        # flight at the deadline, so its rate uses its real length.
        span = 1.0 if i < len(seconds) - 1 else max(run["elapsed_s"] - (sec.t - 1), 1e-3)
        lat = _percentiles(np.frombuffer(sec.latencies, dtype="d"))
        err_lat = _percentiles(np.frombuffer(sec.error_latencies, dtype="d"))
        rejected = sum(n for k, n in sec.records.items() if k.startswith("rejected:"))
        out.append({"t": sec.t, "requests": sec.requests, "ok": sec.ok,
                    "errors": sec.error_count, "rps": round(sec.requests / span, 1),
                    "ok_rps": round(sec.ok / span, 1),
                    "errors_per_s": round(sec.error_count / span, 1),
                    "records_accepted_per_s": round(sec.records.get("accepted", 0) / span, 1),
                    "records_rejected_per_s": round(rejected / span, 1),
                    "p50_ms": lat["p50"], "p90_ms": lat["p90"], "p99_ms": lat["p99"],
                    "max_ms": lat["max"], "error_p50_ms": err_lat["p50"]})
    return out


def all_latencies(run, errors=False):
    """Every latency of answers without error (errors=True: of 5xx answers), seconds."""
    name = "error_latencies" if errors else "latencies"
    if not run["seconds"]:
        return np.zeros(0)
    return np.concatenate([np.frombuffer(getattr(s, name), dtype="d") for s in run["seconds"]])


def _merge_counts(dicts):
    total = {}
    for d in dicts:
        for k, n in d.items():
            total[str(k)] = total.get(str(k), 0) + n
    return dict(sorted(total.items()))


def _cpu(run):
    elapsed = run["elapsed_s"]
    shares = [round((c["user_s"] + c["system_s"]) / elapsed, 3) for c in run["children"]]
    cpu_s = sum(c["user_s"] + c["system_s"] for c in run["children"])
    requests = sum(c["requests"] for c in run["children"])
    return {"processes": len(shares), "user_s": round(sum(c["user_s"] for c in run["children"]), 3),
            "system_s": round(sum(c["system_s"] for c in run["children"]), 3),
            # Includes process start-up (imports, connecting): an upper bound per request.
            "us_per_request": round(cpu_s / requests * 1e6, 1) if requests else None,
            "core_share_per_process": shares,
            "max_core_share": max(shares) if shares else 0.0,
            "cpus": run["config"]["cpus"]}


def summarize(run, threshold=0.01, check_records=True):
    """One run -> the JSON-ready figures (no raw samples).  `check_records`: warn about
    what the answers said of the records (not for the hello-world, which says 1 to all)."""
    cfg = run["config"]
    series = _series(run)
    # Each process's own request counter, independent of the per-second buckets.
    requests = sum(c["requests"] for c in run["children"])
    errors = sum(s["errors"] for s in series)
    status = _merge_counts(s.status for s in run["seconds"])
    error_kinds = _merge_counts(s.errors for s in run["seconds"])
    error_kinds.update({"status_%s" % k: n for k, n in status.items() if int(k) >= 500})
    summary = {
        "label": run["label"], "url": "http://%s:%d" % (cfg["host"], cfg["port"]),
        "processes": cfg["processes"], "concurrency": cfg["concurrency"],
        "duration_s": cfg["duration_s"], "rate_target": cfg["rate"], "order": cfg["order"],
        "elapsed_s": round(run["elapsed_s"], 3),
        "requests": requests, "errors": errors, "error_kinds": error_kinds,
        "status_counts": status,
        "rps": _rate(requests, run["elapsed_s"]),
        # Answers without error per second: what the ratio compares, since a refused
        # connection or a 503 is "fast" but not served.
        "ok_rps": _rate(requests - errors, run["elapsed_s"]),
        "latency_ms": _percentiles(all_latencies(run)),
        "error_latency_ms": _percentiles(all_latencies(run, errors=True)),
        "records": outcome.summarize(_merge_counts(s.records for s in run["seconds"]),
                                     threshold),
        "series": series,
        "connections_opened": sum(c.get("connects", 0) for c in run["children"]),
        "connect_errors_at_start": run.get("connect_errors", 0),
        "loadgen_cpu": _cpu(run),
        "server_cpu_core_share": run.get("server_cpu_core_share"),
        "server_processes": (run["server_cpu"]["processes"] if "server_cpu" in run else []),
        "server_exited": (run["server_cpu"]["exited"] if "server_cpu" in run else []),
        "cores_busy": run.get("cores_busy", {}),
        "cores_steal": run.get("cores_steal", {}),
        "helpers_cpu_core_share": (round(run["helpers_cpu_core_share"], 3)
                                   if "helpers_cpu_core_share" in run else None),
    }
    # Server CPU per answered request: steadier than requests/s when other processes
    # compete for the server's core, since it does not count time spent descheduled.
    share, ok = summary["server_cpu_core_share"], requests - errors
    summary["server_cpu_us_per_request"] = (round(share * run["elapsed_s"] / ok * 1e6, 1)
                                            if share is not None and ok else None)
    summary["warnings"] = _warnings(summary)
    if check_records:
        summary["warnings"] += _record_warnings(summary["records"])
    if requests != sum(x["requests"] for x in series):
        summary["warnings"].append("bug: the per-second series holds %d requests, the "
                                   "processes counted %d" % (sum(x["requests"] for x in series),
                                                             requests))
    return summary


def _rate(count, elapsed_s):
    return round(count / elapsed_s, 1) if elapsed_s else 0.0


def _other_load(s):
    """Cores' worth of CPU used by processes other than the server and the load generator."""
    if not s["cores_busy"] or s["server_cpu_core_share"] is None:
        return None
    ours = (s["server_cpu_core_share"] + sum(s["loadgen_cpu"]["core_share_per_process"])
            + (s["helpers_cpu_core_share"] or 0.0))
    return sum(s["cores_busy"].values()) - sum(s.get("cores_steal", {}).values()) - ours


def _warnings(s):
    warns = []
    cpu = s["loadgen_cpu"]
    if cpu["max_core_share"] >= BUSY_CORE_SHARE:
        warns.append("load generator is the bottleneck: a replay process used %.0f%% of a core "
                     "(add --processes or cores; the server's figures are a lower bound)"
                     % (cpu["max_core_share"] * 100))
    warns += _server_warnings(s)
    others = _other_load(s)
    if others is not None and others > OTHER_LOAD_CORES:
        warns.append("other processes used about %.1f cores during the run (all cores busy: "
                     "%s): the figures are disturbed, measure again on a quiet machine"
                     % (others, ", ".join("%.0f%%" % (v * 100) for v in s["cores_busy"].values())))
    steal = s.get("cores_steal", {})
    if steal and max(steal.values()) > STEAL_SHARE:
        warns.append("the hypervisor ran other machines on this one's cores for %s of the "
                     "run (steal): the figures are of a slower machine than usual"
                     % ", ".join("%.0f%%" % (v * 100) for v in steal.values()))
    if s["rate_target"] and s["rps"] < 0.95 * s["rate_target"]:
        warns.append("offered rate not reached: %.0f of %.0f requests/s"
                     % (s["rps"], s["rate_target"]))
    if s["requests"] and s["errors"] / s["requests"] > 0.01:
        warns.append("%.1f%% of requests failed" % (100.0 * s["errors"] / s["requests"]))
    return warns


def _server_warnings(s):
    """Closed loop: the server should be what limits the throughput."""
    server, procs = s["server_cpu_core_share"], s["server_processes"]
    if server is None or s["rate_target"] is not None or s["order"] == "recorded":
        return []
    warns = []
    if s["server_exited"]:
        warns.append("%d server process(es) exited during the run; their CPU after the "
                     "start is not counted" % len(s["server_exited"]))
    busiest = max((p["core_share"] for p in procs), default=server)
    cores = max(len(s["cores_busy"]), 1)
    machine_full = s["cores_busy"] and min(s["cores_busy"].values()) >= 0.95
    if busiest < 0.85 and server < 0.85 * min(max(len(procs), 1), cores) and not machine_full:
        warns.append("server used only %.0f%% of a core in a closed-loop run%s: something "
                     "else limited the throughput (the load generator, the queue behind the "
                     "server, or another process on its core)"
                     % (server * 100, " (%d processes, busiest %.0f%%)" % (len(procs), busiest * 100)
                        if len(procs) > 1 else ""))
    return warns


def _record_warnings(r):
    warns = []
    if r["over_threshold"]:
        warns.append("FAILED: %.1f%% of the records were rejected (more than %.1f%%): %s"
                     % (r["rejected_share"] * 100, r["threshold"] * 100,
                        _counts(r["rejected_by_reason"])))
    if r["rejected_by_reason"].get("time_too_old"):
        warns.append("records refused as time_too_old: an old capture needs --shift-time")
    told = r["accepted"] + r["rejected"] + r["uncertain"]
    if told and r["uncertain"] > 0.1 * told:
        warns.append("the answers did not tell the fate of %d records (%.0f%%): replay with "
                      "--verbose" % (r["uncertain"], 100.0 * r["uncertain"] / told))
    return warns


def _ratio(target, baseline):
    def div(a, b):
        return round(a / b, 3) if a is not None and b else None
    return {"ok_rps": div(target["ok_rps"], baseline["ok_rps"]),
            "latency_p50": div(target["latency_ms"]["p50"], baseline["latency_ms"]["p50"]),
            "latency_p99": div(target["latency_ms"]["p99"], baseline["latency_ms"]["p99"]),
            # hello's CPU per request / the target's: the throughput ratio if both were CPU-bound
            "cpu_per_request": div(baseline["server_cpu_us_per_request"],
                                   target["server_cpu_us_per_request"])}


def build(runs, meta, max_rejected=0.01):
    """runs: {'target': run, optional 'baseline': run} -> the report.json document.  Only
    the target is held to `max_rejected` (the hello-world accepts anything)."""
    doc = summarize(runs["target"], max_rejected)
    doc["meta"] = meta
    if "baseline" in runs:
        doc["baseline"] = summarize(runs["baseline"], 1.0, check_records=False)
        doc["ratio"] = _ratio(doc, doc["baseline"])
        doc["warnings"] += ["baseline: " + w for w in doc["baseline"]["warnings"]]
    return doc


def write_all(out_dir, runs, meta, max_rejected=0.01):
    doc = build(runs, meta, max_rejected)
    with open(os.path.join(out_dir, "report.json"), "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=2, sort_keys=False)
        fh.write("\n")
    plot_all(out_dir, runs, doc)
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as fh:
        fh.write(markdown(doc))
    return doc


# ==== text ===============================================================================

def _fmt(v, digits=2):
    return "-" if v is None else ("%.*f" % (digits, v))


def _row(name, s):
    lat = s["latency_ms"]
    cpu = s["loadgen_cpu"]
    server = s["server_cpu_core_share"]
    return ("| %s | %s | %d | %d | %.0f | %.0f | %s | %s | %s | %s | %s | %s |"
            % (name, s["url"], s["requests"], s["errors"], s["rps"], s["ok_rps"], _fmt(lat["p50"]),
               _fmt(lat["p90"]), _fmt(lat["p99"]), _fmt(lat["max"]),
               "%.0f%%" % (cpu["max_core_share"] * 100),
               "-" if server is None else "%.0f%%" % (server * 100)))


def markdown(doc):
    meta = doc["meta"]
    lines = ["# Replay report", ""]
    if doc["records"]["over_threshold"]:
        # A diff block renders its "-" lines red on GitHub and GitLab.
        lines += ["```diff", "- " + _failed_line(doc["records"]), "```", ""]
    duration = ("%.0f s per server" % doc["duration_s"] if doc["duration_s"]
                else "the whole log (%.1f s)" % doc["elapsed_s"])
    lines += ["- command: `%s`" % meta.get("command", ""),
              "- date: %s; commit %s" % (meta.get("date", "-"), meta.get("commit", "-")),
              "- log: `%s` (%d requests replayed, %d lines not requests; dropped: %s)"
              % (meta.get("log"), meta.get("log_entries", 0), meta.get("log_skipped", 0),
                 _counts(meta.get("log_dropped") or {})),
              "- load: %d process(es) x %d connections, %s, %s"
              % (doc["processes"], doc["concurrency"], duration, meta.get("mode", "-")),
              "- machine: %s cores; load average %s before, %s after"
              % (meta.get("cpu_count"), _load(meta.get("loadavg_before")),
                 _load(meta.get("loadavg_after")))]
    if meta.get("recorded_span_s") is not None:
        lines.append("- recorded span %.1f s, replayed in %.1f s"
                     % (meta["recorded_span_s"], doc["elapsed_s"]))
    if meta.get("shift_time"):
        lines.append("- record times shifted by %+.0f s (the newest lands at the start)"
                     % meta.get("time_shift_s", 0.0))
    lines += ["- %s" % n for n in meta.get("notes", [])]
    lines += ["", "| run | url | requests | errors | req/s | ok req/s | p50 ms | p90 ms | p99 ms "
                  "| max ms | loadgen CPU (max/process) | server CPU |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    if "baseline" in doc:
        lines.append(_row("baseline (eventlet hello-world)", doc["baseline"]))
    lines.append(_row(doc["label"], doc))
    lines += ["", "Latencies are of answers without error; 5xx answers apart: p50 %s ms, "
                  "p99 %s ms." % (_fmt(doc["error_latency_ms"]["p50"]),
                                  _fmt(doc["error_latency_ms"]["p99"]))]
    if "ratio" in doc:
        r = doc["ratio"]
        lines += ["", "**Ratio target / baseline, same run:** throughput (ok req/s) %s, p50 latency %s, "
                      "p99 latency %s; server CPU per request, baseline / target: %s "
                      "(%s / %s us)." % (_fmt(r["ok_rps"], 3), _fmt(r["latency_p50"], 2),
                                         _fmt(r["latency_p99"], 2), _fmt(r["cpu_per_request"], 3),
                                         _fmt(doc["baseline"]["server_cpu_us_per_request"], 1),
                                         _fmt(doc["server_cpu_us_per_request"], 1))]
    lines += _records_md(doc["records"]) + _cpu_md(doc)
    lines += ["", "Status counts (target): %s" % _counts(doc["status_counts"]),
              "", "Errors (connection errors and 5xx; target): %s" % _counts(doc["error_kinds"])]
    if doc["warnings"]:
        lines += ["", "## Warnings", ""] + ["- %s" % w for w in doc["warnings"]]
    lines += ["", "## Plots", "", "![throughput](throughput.png)", "",
              "![latency](latency.png)", "", "![latency histogram](latency_hist.png)", ""]
    return "\n".join(lines)


def _failed_line(r):
    return ("FAILED: %.1f%% of the records were rejected, more than the %.1f%% allowed "
            "(--max-rejected)" % (r["rejected_share"] * 100, r["threshold"] * 100))


def _records_md(r):
    lines = ["", "## Records (target)", "",
             "What the answers said about the records of the requests sent: %d records; "
             "%d accepted, %d rejected (%.2f%%), %d not told by the answer, %d in failed "
             "requests." % (r["sent"], r["accepted"], r["rejected"], r["rejected_share"] * 100,
                            r["uncertain"], r["failed"])]
    if r["rejected_by_reason"]:
        lines += ["", "| rejected because | records |", "|---|---|"]
        lines += ["| %s | %d |" % kv for kv in r["rejected_by_reason"].items()]
    if r["refused_requests_by_reason"]:
        lines += ["", "Whole requests refused: %s" % _counts(r["refused_requests_by_reason"])]
    return lines


def _cpu_md(doc):
    lines = []
    procs = doc.get("server_processes") or []
    if len(procs) > 1:
        lines += ["", "Server processes (CPU share of a core): %s" % ", ".join(
            "%s [%d] %.0f%%" % (p["name"], p["pid"], p["core_share"] * 100) for p in procs)]
    for name, s in (("baseline", doc.get("baseline")), ("target", doc)):
        if s is not None and s["cores_busy"]:
            lines.append("")
            lines.append("Cores busy during the %s run (all processes): %s" % (name, ", ".join(
                "core %s %.0f%%" % (c, v * 100) for c, v in sorted(s["cores_busy"].items()))))
            steal = s.get("cores_steal") or {}
            if steal:                   # reports made before steal was read have none
                lines.append("Of which the hypervisor took (steal): %s" % ", ".join(
                    "core %s %.0f%%" % (c, v * 100) for c, v in sorted(steal.items())))
    return lines


def _load(values):
    return "-" if not values else "/".join("%.2f" % v for v in values)


def _counts(d):
    return ", ".join("%s: %d" % kv for kv in d.items()) or "none"


def console_summary(doc, color=False):
    lines = []
    for name, s in (("baseline", doc.get("baseline")), ("target", doc)):
        if s is None:
            continue
        lat = s["latency_ms"]
        lines.append("%-8s %s: %d requests, %d errors, %.0f ok req/s, p50 %s ms, p99 %s ms, "
                     "loadgen CPU %.0f%%" % (name, s["url"], s["requests"], s["errors"],
                                             s["ok_rps"], _fmt(lat["p50"]), _fmt(lat["p99"]),
                                             s["loadgen_cpu"]["max_core_share"] * 100))
    r = doc["records"]
    lines.append("records: %d accepted, %d rejected (%.2f%%), %d not told, %d failed"
                 % (r["accepted"], r["rejected"], r["rejected_share"] * 100, r["uncertain"],
                    r["failed"]))
    if "ratio" in doc:
        lines.append("ratio target/baseline: throughput %s" % _fmt(doc["ratio"]["ok_rps"], 3))
    lines += ["WARNING: " + w for w in doc["warnings"] if not w.startswith("FAILED")]
    if r["over_threshold"]:
        line = _failed_line(r)
        lines.append("\033[1;31m%s\033[0m" % line if color else line)
    return "\n".join(lines)


# ==== plots ==============================================================================

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _plain_log_axis(axis):
    """Log scale with tick labels like 3, 10, 40 instead of 3x10^0."""
    from matplotlib import ticker
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _pos: "%g" % v))
    axis.set_minor_formatter(ticker.FuncFormatter(_minor_label))


def _minor_label(value, _pos):
    if value <= 0:
        return ""
    mantissa = value / 10 ** np.floor(np.log10(value))
    return "%g" % value if round(mantissa) in (2, 5) else ""


def _seconds_axis(ax):
    from matplotlib import ticker
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))


def _labelled(doc):
    """(legend label, summary, run key) for each run in the document, baseline first."""
    out = []
    if "baseline" in doc:
        out.append(("baseline (hello-world)", doc["baseline"], "baseline"))
    out.append((doc["label"], doc, "target"))
    return out


def _title(fig, what, doc):
    meta = doc["meta"]
    fig.suptitle("%s: %s %s\n%d x %d connections, %s\n%s, commit %s"
                 % (what, doc["label"], meta.get("url", doc["url"]), doc["processes"],
                    doc["concurrency"], meta.get("mode", "-"), meta.get("date", "-"),
                    meta.get("commit", "-")), fontsize=9, x=0.01, y=1.0, ha="left",
                 va="bottom")


def _legend(ax, **kw):
    """Outside the plotting area, on the right, so it never hides a line."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
                  borderaxespad=0.0, **kw)


def _save(plt, fig, path):
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_all(out_dir, runs, doc):
    plt = _pyplot()
    _plot_throughput(plt, doc, os.path.join(out_dir, PLOTS[0]))
    _plot_latency(plt, doc, os.path.join(out_dir, PLOTS[1]))
    _plot_histogram(plt, runs, doc, os.path.join(out_dir, PLOTS[2]))


def _plot_throughput(plt, doc, path):
    """Three panels sharing the time axis: requests answered without error, errors
    (5xx answers and connection failures) apart, and the target's records."""
    fig, (ax, err_ax, rec_ax) = plt.subplots(3, 1, figsize=(9, 7), sharex=True,
                                             gridspec_kw={"height_ratios": (3, 1.3, 1.6)})
    for label, s, _ in _labelled(doc):
        ts = [p["t"] for p in s["series"]]
        ax.plot(ts, [p["ok_rps"] for p in s["series"]], marker="o", ms=3,
                label="%s (mean %.0f/s)" % (label, s["ok_rps"]))
        err_ax.plot(ts, [p["errors_per_s"] for p in s["series"]], marker="x", ms=4,
                    label="%s (%d in all)" % (label, s["errors"]))
    ts = [p["t"] for p in doc["series"]]
    for key, color, name in (("records_accepted_per_s", "tab:green", "accepted"),
                             ("records_rejected_per_s", "tab:red", "rejected")):
        rec_ax.plot(ts, [p[key] for p in doc["series"]], color=color, marker=".",
                    label="%s (%d in all)" % (name, doc["records"][name]))
    ax.set_ylabel("answered without\nerror (req/s)")
    err_ax.set_ylabel("errors\n(req/s)")
    rec_ax.set_ylabel("%s records\n(per s)" % doc["label"])
    _seconds_axis(rec_ax)
    rec_ax.set_xlabel("time (s)")
    for a in (ax, err_ax, rec_ax):
        a.set_ylim(bottom=0, top=max(1.0, a.get_ylim()[1]))
        a.grid(alpha=0.3)
        _legend(a)
    _title(fig, "Throughput", doc)
    _save(plt, fig, path)


def _plot_latency(plt, doc, path):
    fig, ax = plt.subplots(figsize=(9, 4.5))
    styles = {"target": "-", "baseline": "--"}
    for label, s, key in _labelled(doc):
        ts = [p["t"] for p in s["series"]]
        for pct, color in (("p50", "tab:blue"), ("p90", "tab:orange"), ("p99", "tab:red")):
            values = [p[pct + "_ms"] for p in s["series"]]
            ax.plot(ts, [np.nan if v is None else v for v in values], styles[key], color=color,
                    label="%s %s" % (label, pct))
        errs = [p["error_p50_ms"] for p in s["series"]]
        if any(v is not None for v in errs):
            ax.plot(ts, [np.nan if v is None else v for v in errs], "x", color="tab:gray",
                    label="%s 5xx answers, p50" % label)
    ax.set_yscale("log")
    _plain_log_axis(ax.yaxis)
    _seconds_axis(ax)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("latency (ms, log scale)")
    ax.grid(alpha=0.3, which="both")
    _legend(ax)
    _title(fig, "Latency of answers without error, per second", doc)
    _save(plt, fig, path)


def _plot_histogram(plt, runs, doc, path):
    fig, ax = plt.subplots(figsize=(9, 4.5))
    samples = {}
    for label, s, key in _labelled(doc):
        samples[(label, key, False)] = all_latencies(runs[key]) * 1000.0
        samples[(label, key, True)] = all_latencies(runs[key], errors=True) * 1000.0
    nonempty = [a for a in samples.values() if len(a)]
    if nonempty:
        lo = max(min(a.min() for a in nonempty), 1e-3)
        hi = max(a.max() for a in nonempty) * 1.01
        bins = np.logspace(np.log10(lo), np.log10(max(hi, lo * 1.1)), 80)
        for (label, key, errors), values in samples.items():
            if not len(values):
                continue
            s = doc if key == "target" else doc["baseline"]
            lat = s["error_latency_ms" if errors else "latency_ms"]
            ax.hist(values, bins=bins, histtype="step", linewidth=1.5,
                    linestyle=":" if errors else "-",
                    label="%s%s (p50 %s ms, p99 %s ms)" % (label, ", 5xx answers" if errors
                                                            else "", _fmt(lat["p50"]),
                                                            _fmt(lat["p99"])))
        ax.set_xscale("log")
        _plain_log_axis(ax.xaxis)
        _legend(ax)
    ax.set_xlabel("latency (ms, log scale)")
    ax.set_ylabel("requests")
    ax.grid(alpha=0.3)
    _title(fig, "Latency distribution", doc)
    _save(plt, fig, path)
