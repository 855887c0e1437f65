"""The production tree (supervisord.conf: queue, worker slots, nginx, log rotation) started
from a temporary directory, for the deploy tests and the rolling-restart benchmark.

supervisord is started with its working directory in a temporary site, so every path
under var/ lands there, and INGEST_* variables put nginx, its status listener, the
workers and the bundled queue on free loopback ports; a real `make run` on the same
machine is never touched.  Everything waits by polling with a deadline, and `cleanup()`
kills by pid whatever of the tree is still alive.  Nothing here signals a process that
is not part of the tree it started.
"""
import os
import random
import re
import signal
import socket
import subprocess
import sys
import xmlrpc.client

from testkit.payloads import write_routes
from testkit.procs import pid_alive
from testkit.procs import ROOT, Proc, free_port, port_open, wait_until

LAUNCH = os.path.join(ROOT, "deploy", "launch.py")
SUPERVISORD = os.path.join(os.path.dirname(sys.executable), "supervisord")
SUPERVISORCTL = os.path.join(os.path.dirname(sys.executable), "supervisorctl")
NGINX = "/usr/sbin/nginx"


def programs(conf):
    """The [program:x] names of a supervisord.conf besides the worker slots."""
    with open(conf, encoding="utf-8") as fh:
        names = re.findall(r"(?m)^\[program:([^\]]+)\]", fh.read())
    return [n for n in names if n != "ingest-worker"]


def _bindable(port):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_run(n, attempts=200, exclude=()):
    """A base port such that base..base+n-1 were all free a moment ago.

    Drawn from below the kernel's ephemeral range, which connect() never hands out as a
    source port: a worker slot that restarts during a test (a rolling restart, a kill)
    must find its port free again, while nginx, the load and the probes open connections
    by the thousand.  Falls back to the ephemeral range when there is nothing below it."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            low = int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 1024
    for _ in range(attempts):
        base = (random.randrange(max(10000, low - 12000), low - n) if low - n > 10000
                else free_port())
        ports = range(base, base + n)
        if base + n <= 65535 and not set(ports) & set(exclude) and all(map(_bindable, ports)):
            return base
    raise AssertionError("no run of %d free ports found" % n)


def child_pids(pid):
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as fh:
            return [int(p) for p in fh.read().split()]
    except FileNotFoundError:
        return []


def clean_env(**values):
    """This environment minus any INGEST_* of the caller's shell, plus `values`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGEST_")}
    env.update({k: str(v) for k, v in values.items()})
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


class Tree:
    """supervisord and everything under it, started from `site` (its var/ lives there)."""

    def __init__(self, tmp_path, workers, root=ROOT, **env):
        """`root`: the checkout whose supervisord.conf and code run (a benchmark may
        compare another checkout; its INGEST_* code comes first on PYTHONPATH)."""
        self.site = os.path.join(str(tmp_path), "site")
        os.makedirs(os.path.join(self.site, "var", "log"))  # as `make run` does
        self.routes = os.path.join(str(tmp_path), "routes.json")
        write_routes(self.routes, {})
        self.workers = workers
        # Every port of the tree from below the ephemeral range (see free_port_run).
        self.http_port = free_port_run(1)
        self.status_port = free_port_run(1, exclude=[self.http_port])
        self.queue_port = free_port_run(1, exclude=[self.http_port, self.status_port])
        self.worker_base = free_port_run(workers, exclude=[self.http_port, self.status_port,
                                                           self.queue_port])
        self.env = clean_env(INGEST_WORKERS=workers, INGEST_PORT=self.http_port,
                             INGEST_LISTEN="127.0.0.1", INGEST_STATUS_PORT=self.status_port,
                             INGEST_QUEUE_PORT=self.queue_port,
                             INGEST_WORKER_BASE_PORT=self.worker_base,
                             INGEST_ROUTES=self.routes, **env)
        if root != ROOT:
            self.env["PYTHONPATH"] = root
        self.conf = conf = os.path.join(root, "supervisord.conf")
        self.fixed_programs = programs(conf)
        with open(os.path.join(root, "deploy", "nginx.conf"), encoding="utf-8") as fh:
            self.has_status_listener = "@@STATUS_LISTEN@@" in fh.read()
        # As `make run` starts it: -u (its own uid) keeps the "running as root" CRIT out.
        self.proc = Proc("supervisord", [SUPERVISORD, "-n", "-c", conf, "-u", str(os.getuid())],
                         os.path.join(str(tmp_path), "logs"), env=self.env, cwd=self.site)
        self.seen_pids = set()
        self._rpc = None
        sock = self.path("supervisor.sock")
        assert len(sock) < 100, "unix socket path too long for AF_UNIX: %s" % sock

    @property
    def base_url(self):
        return "http://127.0.0.1:%d" % self.http_port

    @property
    def queue_address(self):
        return "127.0.0.1:%d" % self.queue_port

    def worker_port(self, slot):
        return self.worker_base + slot

    def path(self, *parts):
        return os.path.join(self.site, "var", *parts)

    def rpc(self):
        if self._rpc is None:
            from supervisor.xmlrpc import SupervisorTransport
            transport = SupervisorTransport(None, None, "unix://" + self.path("supervisor.sock"))
            self._rpc = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
        return self._rpc.supervisor

    def infos(self):
        """{'group:name': info} for every program, remembering every pid ever seen."""
        out = {}
        for info in self.rpc().getAllProcessInfo():
            out["%s:%s" % (info["group"], info["name"])] = info
            if info["pid"]:
                self.seen_pids.add(info["pid"])
        return out

    def all_running(self):
        try:
            infos = self.infos()
        except OSError:  # socket not there yet; the transport's connection is now unusable
            self._rpc = None
            return False
        return len(infos) == self.workers + len(self.fixed_programs) and all(
            i["statename"] == "RUNNING" for i in infos.values())

    def start(self):
        self.proc.start()
        self.seen_pids.add(self.proc.pid)
        wait_until(lambda: self.check_alive() and self.all_running(), timeout=20,
                   message="every program RUNNING under supervisord")
        ports = [self.http_port, self.queue_port] + [
            self.worker_port(i) for i in range(self.workers)]
        if self.has_status_listener:
            ports.append(self.status_port)
        wait_until(lambda: self.check_alive() and all(port_open("127.0.0.1", p) for p in ports),
                   timeout=15, message="nginx, queue and every worker listening")
        self.nginx_pids()  # remembered, so a failed test's teardown can reap them too
        return self

    def check_alive(self):
        if not self.proc.alive():
            raise AssertionError("supervisord exited %s:\n%s\n%s"
                                 % (self.proc.popen.returncode, self.proc.output(),
                                    self.logs()))
        return True

    def nginx_pids(self):
        master = self.infos()["nginx:nginx"]["pid"]
        pids = [master] + child_pids(master)
        self.seen_pids.update(pids)
        return pids

    def logs(self, limit=3000):
        text = []
        log_dir = self.path("log")
        for name in sorted(os.listdir(log_dir)) if os.path.isdir(log_dir) else ():
            try:
                with open(os.path.join(log_dir, name), "rb") as fh:
                    tail = fh.read()[-limit:].decode("utf-8", "replace")
            except FileNotFoundError:   # rotated away since the listing
                continue
            text.append("== %s\n%s" % (name, tail))
        return "\n".join(text)

    def log_text(self, name):
        with open(self.path("log", name), "rb") as fh:
            return fh.read().decode("utf-8", "replace")

    def ctl(self, *args):
        """`supervisorctl -c supervisord.conf ARGS` run from the site, as the docs say."""
        done = subprocess.run([SUPERVISORCTL, "-c", self.conf] + list(args), cwd=self.site, env=self.env, capture_output=True,
                              text=True, timeout=20)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def stop(self):
        """SIGTERM supervisord (as Ctrl-C/`kill` would) and return its exit code."""
        return self.proc.stop(timeout=30)

    def cleanup(self):
        """Teardown after a failure: stop the tree, then kill any pid of it still alive."""
        if self.proc.popen is not None and self.proc.alive():
            self.proc.stop(timeout=30)
        for pid in self.seen_pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
