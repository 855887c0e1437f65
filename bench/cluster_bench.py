"""Several hosts on the namespace test bed: throughput with 1, 2 and 3 queue hosts, the
time a cut-off queue host's backlog takes to be served once it returns, and how fast
`ingest queue export` drains a lost host's directory.

    .venv/bin/python -m bench.cluster_bench [--rounds 3] [--seconds 8] [--threads 16]
        [--batch 10] [--cut-s 10] [--backlog-s 5] [--export-items 50000] [--skip-a|b|c]

The bed (testkit/cluster.py): a load balancer (nginx), two worker hosts (one `ingest
serve` each) and three queue hosts (`ingest queue --sync-ms 100`), plus a client host
where this process sends the load and consumes.  Every host is a network namespace on
one machine, so they share its cores: the figures say how the pieces scale against each
other here, not what separate machines would do.

(a) Events/s through the load balancer: both workers restarted with `--kestrel` listing
    1, 2, then 3 queue hosts; unpaced load (`--threads` keep-alive connections, `--batch`
    events per POST) for `--seconds`, after a one-second warm-up.  Rounds interleave the
    three set-ups; prints each round, the medians, the ratios to 1 host, and the CPU share
    of each kind of process (from /proc), which says what limits the rate.
(b) Backlog after a return: paced load (about 3,000 events/s) with no consumer for
    `--backlog-s`, then q1 cut off for `--cut-s` while a consumer of the whole cluster
    runs; after q1's return: the time to its first item and until its whole backlog was
    read (each host is FIFO, so "whole" is exact).
(c) `ingest queue export` run on the client host: a directory of `--export-items`
    250-byte events, drained into the three queue hosts; items/s.

Bounded (fixed durations, a deadline on every wait); every process is stopped by pid and
every namespace deleted (testkit/netns.py).  No traffic leaves the bed's namespaces
(and loopback for (c)'s source server).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

from ingest.kestrel import Client
from testkit.cluster import Cluster, Recorder
from testkit.load import Load
from testkit.procs import QueueServer, cpu_seconds, ingest_argv, wait_until
from testkit.tree import child_pids

QUEUE = "events"


def cpu_of(cluster):
    """{kind: CPU seconds so far} for workers, nginx (master and workers), queue hosts
    and this process (the load generator and the consumer)."""
    out = {"workers": 0.0, "nginx": 0.0, "queues": 0.0, "client": cpu_seconds(os.getpid())}
    for host in cluster.workers:
        out["workers"] += cpu_seconds(cluster.proc(host).pid)
    for host in cluster.queues:
        out["queues"] += cpu_seconds(cluster.proc(host).pid)
    master = cluster.proc(cluster.lb).pid
    for pid in [master] + child_pids(master):
        out["nginx"] += cpu_seconds(pid)
    return out


def use_queue_hosts(cluster, n):
    """Restart both workers writing to the first `n` queue hosts."""
    kestrel = ",".join(cluster.queue_addresses[:n])
    for host in cluster.workers:
        cluster.proc(host).stop()
        cluster.start_worker(host, kestrel)


def load(cluster, seconds, threads, batch, prefix, pace_s=0.0):
    return cluster.client.call(lambda: Load(cluster.lb.ip, 80, threads=threads, batch=batch,
                                            pace_s=pace_s, max_requests=10 ** 9,
                                            duration_s=seconds, prefix=prefix).start())


def one_rate(cluster, n, args, tag):
    use_queue_hosts(cluster, n)
    load(cluster, 1.0, args.threads, args.batch, "warm-%s" % tag).wait()
    before, t0 = cpu_of(cluster), time.monotonic()
    result = load(cluster, args.seconds, args.threads, args.batch, "a-%s" % tag).wait()
    after, elapsed = cpu_of(cluster), time.monotonic() - t0
    share = {k: round((after[k] - before[k]) / elapsed, 2) for k in after}
    bad = result.requests - result.count(200)
    return result.events_per_s(), share, bad


def part_a(cluster, args):
    rates = {1: [], 2: [], 3: []}
    for r in range(args.rounds):
        for n in (1, 2, 3):
            rate, share, bad = one_rate(cluster, n, args, "%d-%d" % (r, n))
            rates[n].append(rate)
            per_event = {k: round(v / rate * 1e6, 1) for k, v in share.items()}
            print("round %d, %d queue host%s: %7.0f events/s  cores busy %s  CPU us/event %s"
                  "  non-200 %d" % (r + 1, n, "s" if n > 1 else " ", rate, share, per_event,
                                    bad), flush=True)
    base = statistics.median(rates[1])
    for n in (1, 2, 3):
        med = statistics.median(rates[n])
        print("(a) %d queue host%s: median %7.0f events/s, ratio to 1 host %.2f"
              % (n, "s" if n > 1 else " ", med, med / base))
    use_queue_hosts(cluster, 3)


def one_backlog(cluster, args, tag):
    q1 = cluster.queues[0]
    q1_address = cluster.queue_address(q1)
    paced = load(cluster, 3600, 6, args.batch, "b-%s" % tag, pace_s=0.02)
    recorder = Recorder(cluster, QUEUE)
    try:
        wait_until(lambda: time.monotonic() - paced.result.started >= args.backlog_s,
                   timeout=args.backlog_s + 5, interval=0.1, message="backlog built")
        backlog = cluster.queue_field(QUEUE, "items")[q1_address]
        cluster.bed.cut(q1)
        cut_at = time.monotonic()
        recorder.start()
        wait_until(lambda: time.monotonic() - cut_at >= args.cut_s, timeout=args.cut_s + 5,
                   interval=0.1, message="the end of the cut")
        cluster.bed.restore(q1)
        back = time.monotonic()
        wait_until(lambda: recorder.count(q1_address, since=back) > 0, timeout=60,
                   interval=0.01, message="q1's first item")
        first = time.monotonic() - back
        wait_until(lambda: recorder.count(q1_address, since=back) >= backlog, timeout=120,
                   interval=0.01, message="q1's backlog")
        whole = time.monotonic() - back
    finally:
        paced.stop()
        recorder.stop()
    return backlog, first, whole, paced.result.events_per_s()


def empty_the_cluster(cluster):
    """What (a) left queued would be everyone's backlog: flush it."""
    def flush():
        with Client(cluster.queue_addresses) as client:
            return client.flush(QUEUE)
    assert cluster.client.call(flush)


def part_b(cluster, args):
    empty_the_cluster(cluster)
    for r in range(args.rounds):
        backlog, first, whole, rate = one_backlog(cluster, args, str(r))
        print("(b) round %d: load %.0f events/s; q1 held %d items when cut off for %d s;"
              " after its return: first item %.2f s, whole backlog %.2f s (%.0f items/s)"
              % (r + 1, rate, backlog, args.cut_s, first, whole,
                 backlog / max(whole - first, 1e-3)), flush=True)
        # Leave nothing for the next round: drain every host.
        drain = Recorder(cluster, QUEUE).start()
        wait_until(lambda: not any(cluster.queue_field(QUEUE, "items").values()),
                   timeout=120, interval=0.2, message="the cluster drained")
        drain.stop()


def part_c(cluster, args, work):
    source = QueueServer(work, name="lost", quiet=True, logdir=work).start()
    event = b'{"event":"e","properties":{"token":"t","$insert_id":"%08d","pad":"%s"}}'
    with Client([source.address]) as client:
        for i in range(0, args.export_items, 500):
            client.put_many([(QUEUE, event % (j, b"x" * 170))
                             for j in range(i, min(i + 500, args.export_items))])
    source.proc.stop()
    t0 = time.monotonic()
    done = cluster.client.run(ingest_argv("queue", "export", "--data", source.data,
                                          "--kestrel", cluster.kestrel, quiet=True),
                              timeout=600)
    took = time.monotonic() - t0
    if done.returncode != 0:
        raise SystemExit("export failed:\n%s%s" % (done.stdout, done.stderr))
    print("(c) export of %d items into 3 queue hosts: %.1f s, %.0f items/s (start-up"
          " included)" % (args.export_items, took, args.export_items / took))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--cut-s", type=float, default=10.0)
    p.add_argument("--backlog-s", type=float, default=5.0)
    p.add_argument("--export-items", type=int, default=50000)
    for part in "abc":
        p.add_argument("--skip-" + part, action="store_true")
    args = p.parse_args(argv)
    print("load average at start: %s" % " ".join(open("/proc/loadavg").read().split()[:3]))
    with tempfile.TemporaryDirectory(prefix="cluster-bench-", dir="/var/tmp") as work:
        cluster = Cluster(work)
        try:
            cluster.start()
            if not args.skip_a:
                part_a(cluster, args)
            if not args.skip_b:
                part_b(cluster, args)
            if not args.skip_c:
                part_c(cluster, args, work)
        finally:
            cluster.close()
    print("load average at end: %s" % " ".join(open("/proc/loadavg").read().split()[:3]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
