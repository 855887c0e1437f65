"""Counters and a latency histogram for one worker, exported at /metrics.

The hot path only bumps plain dict entries (PERF: a prometheus_client `labels().inc()`
takes a lock and a few dict lookups, ~1-2 us; a dict increment ~0.1 us).  At scrape time
a custom collector turns them into Prometheus metric families, rendered by
prometheus_client in the text exposition format.  Nothing here touches sockets or eventlet.
"""
import bisect
import collections
import operator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_QUEUE = operator.itemgetter(0)
# Request latency buckets in seconds (upper bounds); +Inf is implicit.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self, state=None, router=None, spool=None, client=None):
        self.state = state
        self.router = router
        self.spool = spool
        self.client = client
        self.requests = {}        # (endpoint, status) -> n
        self.accepted = {}        # (endpoint, queue) -> records
        self.rejected = {}        # (endpoint, reason) -> records or requests
        self.latency = {}         # endpoint -> [bucket counts..., sum]
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))

    # -- hot path --

    def count(self, kind, endpoint, value):
        """The app's hook: ('rejected', endpoint, reason) or ('request_error', endpoint, reason)."""
        if kind in ("rejected", "request_error"):
            key = (endpoint, value)
            self.rejected[key] = self.rejected.get(key, 0) + 1

    def accepted_pairs(self, endpoint, pairs):
        # PERF: counted per queue at C speed (set/Counter over map): 50 pairs to one
        # queue cost about a third of a Python loop of dict increments.
        acc = self.accepted
        queues = set(map(_QUEUE, pairs))
        counts = ((queues.pop(), len(pairs)),) if len(queues) == 1 else \
            collections.Counter(map(_QUEUE, pairs)).items()
        for queue, n in counts:
            key = (endpoint, queue)
            acc[key] = acc.get(key, 0) + n

    def request(self, endpoint, status, seconds):
        key = (endpoint, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        row = self.latency.get(endpoint)
        if row is None:
            row = self.latency[endpoint] = [0] * (len(BUCKETS) + 2)
        row[bisect.bisect_left(BUCKETS, seconds)] += 1
        row[-1] += seconds

    # -- scrape --

    def render(self):
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# name -> (kind, help, labels): every family /metrics exposes, and the source of
# docs/reference/metrics.md.  Counters are exposed with the `_total` suffix.
METRICS = {
    "ingest_requests": ("counter", "HTTP requests by endpoint and status",
                        ("endpoint", "status")),
    "ingest_records_accepted": ("counter", "records queued, by endpoint and queue",
                                ("endpoint", "queue")),
    "ingest_records_rejected": ("counter", "records (or whole requests) refused, by reason"
                                " (docs/reference/reasons.md)", ("endpoint", "reason")),
    "ingest_records_overflow": ("counter", "records sent to an overflow queue, by base queue",
                                ("queue",)),
    "ingest_records_blocked": ("counter", "records from blocked tokens (answered, not queued)",
                               ()),
    "ingest_records_unknown_token": ("counter", "records whose token has no routes entry"
                                     " (default queue)", ()),
    "ingest_routes_reloads": ("counter", "routes files loaded by SIGHUP", ()),
    "ingest_routes_reload_failures": ("counter", "routes reloads refused (last good table"
                                      " kept)", ()),
    "ingest_routes_stale": ("gauge", "1 while the routes file is refused and the worker"
                            " routes with its last good table (see /ready)", ()),
    "ingest_spool_bytes": ("gauge", "bytes in the local spool", ()),
    "ingest_spool_appended_records": ("counter", "records written to the spool by this"
                                      " process", ()),
    "ingest_spool_write_errors": ("counter", "spool appends that failed (disk full, I/O"
                                  " error); those requests got 503", ()),
    "ingest_spool_damaged_records": ("counter", "records found unreadable in the spool (as"
                                     " far as can be told), their bytes kept in .damaged"
                                     " files", ()),
    "ingest_spool_damaged_bytes": ("counter", "unreadable spool bytes kept in .damaged"
                                   " files", ()),
    "ingest_spool_dead_letters": ("counter", "spooled records every Kestrel server refused,"
                                  " moved to .dead files", ()),
    "ingest_kestrel_errors": ("counter", "failed Kestrel operations, by server", ("server",)),
    "ingest_requests_in_flight": ("gauge", "requests being handled", ()),
    "ingest_request_body_bytes_in_flight": ("gauge", "bytes of request bodies held"
                                            " (decompressed), charged against"
                                            " max_body_bytes_in_flight", ()),
    "ingest_accept_errors": ("counter", "accept() failures survived (out of file"
                             " descriptors: EMFILE, ENFILE)", ()),
    "ingest_request_duration_seconds": ("histogram", "time to answer a request",
                                        ("endpoint",)),
}
_FAMILY = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily,
           "histogram": HistogramMetricFamily}


def family(name, value=None):
    """An empty metric family for `name`, as the catalogue describes it (or, for a
    label-less one, with its single value)."""
    kind, help_text, labels = METRICS[name]
    if value is not None:
        return _FAMILY[kind](name, help_text, value=value)
    return _FAMILY[kind](name, help_text, labels=labels)


def _labelled(name, counts):
    """A family with one sample per (label values) -> count, in sorted order."""
    fam = family(name)
    for key, n in sorted(counts.items()):
        fam.add_metric(tuple(str(k) for k in (key if isinstance(key, tuple) else (key,))), n)
    return fam


class _Collector:
    def __init__(self, metrics):
        self.m = metrics

    def collect(self):
        m = self.m
        yield _labelled("ingest_requests", m.requests)
        yield _labelled("ingest_records_accepted", m.accepted)
        yield _labelled("ingest_records_rejected", m.rejected)
        if m.router is not None:
            yield from self._routing(m.router)
        if m.spool is not None:
            yield family("ingest_spool_bytes", m.spool.size_bytes())
            yield family("ingest_spool_appended_records", m.spool.appended_records)
            yield family("ingest_spool_write_errors", m.spool.write_errors)
            yield family("ingest_spool_damaged_records", m.spool.damaged_records)
            yield family("ingest_spool_damaged_bytes", m.spool.damaged_bytes)
            yield family("ingest_spool_dead_letters", m.spool.dead_letters)
        if m.client is not None:
            yield _labelled("ingest_kestrel_errors", {
                server.address: server.errors for server in m.client.cluster.servers})
        if m.state is not None:
            yield family("ingest_requests_in_flight", m.state.in_flight)
            yield family("ingest_request_body_bytes_in_flight", m.state.body_bytes)
            yield family("ingest_accept_errors", m.state.accept_errors)
        yield self._latency(m.latency)

    @staticmethod
    def _routing(router):
        table = router.table
        yield _labelled("ingest_records_overflow", table.overflowed)
        yield family("ingest_records_blocked", table.blocked)
        yield family("ingest_records_unknown_token", table.unknown)
        yield family("ingest_routes_reloads", router.reloads)
        yield family("ingest_routes_reload_failures", router.reload_failures)
        yield family("ingest_routes_stale", 1 if getattr(router, "stale", None) else 0)

    @staticmethod
    def _latency(latency):
        fam = family("ingest_request_duration_seconds")
        for endpoint, row in sorted(latency.items()):
            cumulative, buckets = 0, []
            for bound, n in zip(BUCKETS, row):
                cumulative += n
                buckets.append((repr(bound), cumulative))
            cumulative += row[len(BUCKETS)]
            buckets.append(("+Inf", cumulative))
            fam.add_metric((endpoint,), buckets, sum_value=row[-1])
        return fam
