"""A cluster of hosts on the namespace test bed (testkit/netns.py), as docs/cluster.md
describes it: a load balancer (nginx), worker hosts (`ingest serve` with a spool) and
queue hosts (`ingest queue`), plus a client host for the load, the consumers and the
operator's commands.

    cluster = Cluster(tmp_path)          # client, lb, w1 w2, q1 q2 q3 on 10.77.0.0/24
    cluster.start()                      # every program listening on its production port
    cluster.lb_url, cluster.kestrel      # what clients and consumers are given
    cluster.bed.cut(cluster.queues[0])   # a partition; restore() ends it
    cluster.close()                      # stop everything by pid, delete the namespaces
    Recorder(cluster, "events").start()  # a consumer of every queue host, in the client
                                         # host, noting which host each item came from

Every host uses the production ports (queue 22133, worker 8000, load balancer 80): each
host has its own network stack, so nothing collides with anything else on the machine.
The test and the benchmark both build on this.

What it must not do: decide what "lost" means (the callers compare what was acknowledged
with what the Recorder read), start anything outside the bed's namespaces, or sleep to
wait for something: every wait polls with a deadline.
"""
import json
import os
import threading
import time

from ingest.kestrel.client import Client
from ingest.kestrel.consumer import Consumer
from ingest.kestrel.errors import KestrelUnavailable
from testkit.netns import Bed
from testkit.procs import ingest_argv, port_open, wait_until

QUEUE_PORT = 22133
WORKER_PORT = 8000
LB_PORT = 80
NGINX = "/usr/sbin/nginx"
# The workers' Kestrel timing on the bed: a host that does not answer costs a batch at
# most 300 ms (connect) or 1 s (reply), and is tried again after 1 s.
WORKER_FLAGS = ("--kestrel-connect-timeout-ms", "300", "--kestrel-timeout-ms", "1000",
                "--kestrel-retry-ms", "1000")
# The load balancer waits this long for a worker's answer before it sends the request
# to another worker.  It must be longer than the longest a worker takes to answer: the
# Kestrel timeout once per queue host (3 x 1 s), then the spool.
LB_READ_TIMEOUT_S = 5

LB_CONF = """\
daemon off;
master_process on;
worker_processes 1;
user root;
pid {dir}/nginx.pid;
error_log stderr error;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream worker_hosts {{
        least_conn;
        zone worker_hosts 256k;
{servers}
        keepalive 32;
    }}
    server {{
        listen {port} backlog=4096;
        client_max_body_size 10m;
        client_body_buffer_size 10m;
        location / {{
            proxy_pass http://worker_hosts;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_next_upstream error timeout non_idempotent;
            proxy_next_upstream_tries 0;
            proxy_connect_timeout 1s;
            proxy_send_timeout {read_timeout}s;
            proxy_read_timeout {read_timeout}s;
        }}
        error_page 502 504 =503 @unavailable;
        location @unavailable {{
            add_header Retry-After 1 always;
            return 503 '{{"status":0,"error":"no worker available"}}';
        }}
    }}
}}
"""


def render_lb(directory, workers, port=LB_PORT, read_timeout_s=LB_READ_TIMEOUT_S):
    """Write nginx.conf for a load balancer over `workers` ("ip:port"); returns its path."""
    os.makedirs(directory, exist_ok=True)
    servers = "\n".join("        server %s max_fails=1 fail_timeout=1s;" % w for w in workers)
    path = os.path.join(directory, "nginx.conf")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(LB_CONF.format(dir=directory, servers=servers, port=port,
                                read_timeout=read_timeout_s))
    return path


class Cluster:
    """The hosts, their programs and the addresses clients are given."""

    def __init__(self, tmp, queues=3, workers=2, worker_flags=WORKER_FLAGS, queue_sync_ms=100):
        self.tmp = str(tmp)
        self.logdir = os.path.join(self.tmp, "logs")
        self.worker_flags = list(worker_flags)
        self.queue_sync_ms = queue_sync_ms
        self.bed = Bed()
        try:
            self.client = self.bed.add_host("client")
            self.lb = self.bed.add_host("lb")
            self.workers = [self.bed.add_host("w%d" % (i + 1)) for i in range(workers)]
            self.queues = [self.bed.add_host("q%d" % (i + 1)) for i in range(queues)]
        except BaseException:
            self.bed.close()
            raise
        self.procs = {}            # host name -> its current Proc

    # -- addresses --

    @staticmethod
    def queue_address(host):
        return "%s:%d" % (host.ip, QUEUE_PORT)

    @property
    def queue_addresses(self):
        return [self.queue_address(q) for q in self.queues]

    @property
    def kestrel(self):
        """Every queue host, as `--kestrel` takes it."""
        return ",".join(self.queue_addresses)

    @property
    def lb_url(self):
        return "http://%s:%d" % (self.lb.ip, LB_PORT)

    def spool(self, worker):
        return os.path.join(self.tmp, worker.name + "-spool")

    def data(self, queue):
        return os.path.join(self.tmp, queue.name + "-data")

    # -- programs --

    def start(self, kestrel=None):
        """Start every queue host, every worker host (writing to `kestrel`, default all
        queue hosts) and the load balancer; return once each listens."""
        for q in self.queues:
            self.start_queue(q, wait=False)
        for w in self.workers:
            self.start_worker(w, kestrel, wait=False)
        self.start_lb(wait=False)
        for q in self.queues:
            self.wait_listening(q, QUEUE_PORT)
        for w in self.workers:
            self.wait_listening(w, WORKER_PORT)
        self.wait_listening(self.lb, LB_PORT)
        return self

    def start_queue(self, host, wait=True):
        argv = ingest_argv("queue", "--host", "0.0.0.0", "--port", QUEUE_PORT,
                           "--data", self.data(host), "--sync-ms", self.queue_sync_ms, quiet=True)
        self.procs[host.name] = host.spawn("queue", argv, self.logdir)
        if wait:
            self.wait_listening(host, QUEUE_PORT)
        return self.procs[host.name]

    def start_worker(self, host, kestrel=None, wait=True):
        argv = ingest_argv("serve", "--host", "0.0.0.0", "--port", WORKER_PORT,
                           "--kestrel", kestrel or self.kestrel, "--spool", self.spool(host),
                           "--trusted-proxies", "%s/32" % self.lb.ip, *self.worker_flags,
                           quiet=True)
        self.procs[host.name] = host.spawn("worker", argv, self.logdir)
        if wait:
            self.wait_listening(host, WORKER_PORT)
        return self.procs[host.name]

    def start_lb(self, wait=True):
        directory = os.path.join(self.tmp, "lb")
        conf = render_lb(directory, ["%s:%d" % (w.ip, WORKER_PORT) for w in self.workers])
        argv = [NGINX, "-e", "stderr", "-p", directory, "-c", conf]
        self.procs["lb"] = self.lb.spawn("nginx", argv, self.logdir)
        if wait:
            self.wait_listening(self.lb, LB_PORT)
        return self.procs["lb"]

    def proc(self, host):
        return self.procs[host.name]

    def wait_listening(self, host, port, timeout=30.0):
        """Poll from the client host until host:port accepts connections; fail with the
        program's output when it exits first."""
        proc = self.procs[host.name]

        def listening():
            if not proc.alive():
                raise AssertionError("%s exited with %s before listening:\n%s"
                                     % (proc.name, proc.popen.returncode, proc.output()))
            return port_open(host.ip, port)

        self.client.call(wait_until, listening, timeout, 0.02,
                         "%s listening on %s:%d" % (proc.name, host.ip, port))

    # -- looking at the queue hosts --

    def stats(self, timeout_ms=500):
        """{address: Client.stats() entry, None when the host does not answer}, asked
        from the client host."""
        def ask():
            with Client(self.queue_addresses, connect_timeout_ms=timeout_ms,
                        timeout_ms=timeout_ms) as client:
                return client.stats()
        return self.client.call(ask)

    def queue_field(self, queue, field, timeout_ms=500):
        """{address: that queue's `field` on each host (0 when it has no such queue),
        None for a host that does not answer}."""
        out = {}
        for address, s in self.stats(timeout_ms).items():
            out[address] = None if s is None else s["queues"].get(queue, {}).get(field, 0)
        return out

    def close(self):
        try:
            self.bed.stop_processes()
        finally:
            self.bed.close()


class Recorder:
    """Consumes `queue` from every queue host in a thread of the client host and records
    (insert_id, host, time) for each item, confirming it afterwards."""

    def __init__(self, cluster, queue):
        self.cluster = cluster
        self.queue = queue
        self.items = []
        self.errors = 0
        self._stop = threading.Event()
        self.thread = None

    def start(self):
        self.thread = self.cluster.client.thread(self._run, name="recorder")
        return self

    def _run(self):
        with Consumer(self.cluster.queue_addresses, self.queue, connections=6, wait_ms=200,
                      connect_timeout_ms=300, timeout_ms=1000, retry_ms=500) as consumer:
            while not self._stop.is_set():
                try:
                    batch = consumer.fetch()
                except KestrelUnavailable:
                    self.errors += 1
                    self._stop.wait(0.1)      # a consumer's back-off: no host answers
                    continue
                now = time.monotonic()
                for item in batch:
                    iid = json.loads(item.data)["properties"]["$insert_id"]
                    self.items.append((iid, item.server, now))
                consumer.confirm(batch)

    def stop(self):
        self._stop.set()
        self.thread.join(15)
        assert not self.thread.is_alive(), "the recorder did not stop"

    def count(self, address=None, since=None, until=None):
        return sum(1 for _iid, server, t in list(self.items)
                   if (address is None or server == address) and
                   (since is None or t >= since) and (until is None or t < until))

    def ids(self):
        return {iid for iid, _server, _t in list(self.items)}
