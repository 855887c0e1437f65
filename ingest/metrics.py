"""Counters and a latency histogram for one worker, exported at /metrics.

The hot path only bumps plain dict entries (PERF: a prometheus_client `labels().inc()`
takes a lock and a few dict lookups, ~1-2 us; a dict increment ~0.1 us).  At scrape time
a custom collector turns them into Prometheus metric families, rendered by
prometheus_client in the text exposition format.  Nothing here touches sockets or eventlet.
"""
import bisect

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

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
        acc = self.accepted
        for queue, _ in pairs:
            key = (endpoint, queue)
            acc[key] = acc.get(key, 0) + 1

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


class _Collector:
    def __init__(self, metrics):
        self.m = metrics

    def collect(self):
        m = self.m
        fam = CounterMetricFamily("ingest_requests", "HTTP requests by endpoint and status",
                                  labels=("endpoint", "status"))
        for (endpoint, status), n in sorted(m.requests.items()):
            fam.add_metric((endpoint, str(status)), n)
        yield fam
        fam = CounterMetricFamily("ingest_records_accepted", "records queued, by endpoint and queue",
                                  labels=("endpoint", "queue"))
        for (endpoint, queue), n in sorted(m.accepted.items()):
            fam.add_metric((endpoint, queue), n)
        yield fam
        fam = CounterMetricFamily("ingest_records_rejected",
                                  "records (or whole requests) refused, by reason",
                                  labels=("endpoint", "reason"))
        for (endpoint, reason), n in sorted(m.rejected.items()):
            fam.add_metric((endpoint, reason), n)
        yield fam
        if m.router is not None:
            table = m.router.table
            fam = CounterMetricFamily("ingest_records_overflow",
                                      "records sent to an overflow queue, by base queue",
                                      labels=("queue",))
            for queue, n in sorted(table.overflowed.items()):
                fam.add_metric((queue,), n)
            yield fam
            yield CounterMetricFamily("ingest_records_blocked",
                                      "records from blocked tokens (answered, not queued)",
                                      value=table.blocked)
            yield CounterMetricFamily("ingest_records_unknown_token",
                                      "records whose token has no routes entry (default queue)",
                                      value=table.unknown)
            yield CounterMetricFamily("ingest_routes_reloads", "routes files loaded by SIGHUP",
                                      value=m.router.reloads)
            yield CounterMetricFamily("ingest_routes_reload_failures",
                                      "routes reloads refused (last good table kept)",
                                      value=m.router.reload_failures)
        if m.spool is not None:
            yield GaugeMetricFamily("ingest_spool_bytes", "bytes in the local spool",
                                    value=m.spool.size_bytes())
            yield CounterMetricFamily("ingest_spool_appended_records",
                                      "records written to the spool by this process",
                                      value=m.spool.appended_records)
        if m.client is not None:
            fam = CounterMetricFamily("ingest_kestrel_errors",
                                      "failed Kestrel operations, by server", labels=("server",))
            for server in m.client.cluster.servers:
                fam.add_metric((server.address,), server.errors)
            yield fam
        if m.state is not None:
            yield GaugeMetricFamily("ingest_requests_in_flight", "requests being handled",
                                    value=m.state.in_flight)
        fam = HistogramMetricFamily("ingest_request_duration_seconds",
                                    "time to answer a request", labels=("endpoint",))
        for endpoint, row in sorted(m.latency.items()):
            cumulative, buckets = 0, []
            for bound, n in zip(BUCKETS, row):
                cumulative += n
                buckets.append((repr(bound), cumulative))
            cumulative += row[len(BUCKETS)]
            buckets.append(("+Inf", cumulative))
            fam.add_metric((endpoint,), buckets, sum_value=row[-1])
        yield fam
