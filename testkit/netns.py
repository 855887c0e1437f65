"""Hosts as Linux network namespaces on one bridge: a test bed for several machines.

    bed = Bed()                          # Unavailable(reason) where namespaces cannot be made
    q1 = bed.add_host("q1")              # namespace + veth pair + address 10.77.0.x
    proc = q1.spawn("queue", argv, logdir)   # `ip netns exec NS argv`, stopped by pid
    q1.call(fn, *args)                   # fn run by a thread inside q1's namespace
    bed.cut(q1); bed.restore(q1)         # a partition: q1's link down, then up
    bed.isolate(w2, [q1, q2])            # one-sided: w2 cannot reach q1, q2 (blackhole)
    bed.close()                          # kill what runs inside, delete every namespace

Layout: one "switch" namespace holds a bridge; each host is a namespace whose `eth0` is
one end of a veth pair, the other end (named after the host) plugged into the bridge.
Nothing is created in the caller's own namespace (no interface, address or route), so
every run can use the same subnet without meeting another run (parallel test sessions,
other people's tests on the same machine), and traffic stays inside the namespaces this
bed made.  A cut sets the switch end of a host's link down: the host keeps its address
and its processes, and its packets go nowhere, as when a cable or a switch port fails
(no reset is sent to anyone; netem is not needed).

Processes: `ip netns exec` execs the program, so the pid a Proc holds is the program's
own, stopped by that pid.  The caller reaches a host from a thread that entered the
host's namespace (`Host.call`, `Host.thread`); threads started from such a thread stay
in it, which is how a load driver runs "on" a client host inside this process.

Teardown: `close()` SIGKILLs every process still inside the bed's namespaces (by the
pids `ip netns pids` lists), then deletes the namespaces (veths and bridge go with them).
It is idempotent and runs from the fixture's teardown and from an atexit finalizer.
Names are `ikt-<pid>-<n>-<host>`; `sweep()` removes the namespaces (and processes) of
earlier runs whose creating process is gone: a run killed with SIGKILL leaves nothing
behind past the next run.

What it must not do: touch the caller's namespace, or any namespace, process or
interface whose name does not carry this prefix; sleep to wait for something.
"""
import atexit
import ctypes
import os
import re
import shutil
import signal
import subprocess
import threading
import time

from testkit.procs import Proc, pid_alive

PREFIX = "ikt"
SUBNET = "10.77.0"           # /24 inside the bed; hosts get .10, .11, ...
NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
_NAME = re.compile(r"^%s-(\d+)-\d+-" % PREFIX)
_counter = [0]
_libc = None


class Unavailable(Exception):
    """Network namespaces cannot be made here (the reason is the message)."""


def _ip(*args, check=True):
    done = subprocess.run(["ip"] + [str(a) for a in args], capture_output=True, text=True,
                          timeout=20)
    if check and done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, ["ip"] + list(args),
                                            done.stdout, done.stderr)
    return done.stdout


def namespaces():
    """Names of every network namespace `ip netns` knows."""
    return [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]


def ns_pids(ns):
    try:
        return [int(p) for p in _ip("netns", "pids", ns).split()]
    except subprocess.CalledProcessError:
        return []


def kill_and_delete(names, timeout=10.0):
    """SIGKILL every process inside `names`, wait until they are gone, delete them."""
    for ns in names:
        for pid in ns_pids(ns):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout
    for ns in names:
        while any(pid_alive(p) for p in ns_pids(ns)) and time.monotonic() < deadline:
            time.sleep(0.02)   # poll interval: the kernel reaps them
    for ns in names:
        _ip("netns", "del", ns, check=False)


def sweep():
    """Delete the namespaces (and their processes) of earlier runs whose process is gone."""
    stale = []
    for ns in namespaces():
        m = _NAME.match(ns)
        if m and not pid_alive(int(m.group(1))):
            stale.append(ns)
    # Hosts first, the switch (which holds the bridge) last.
    stale.sort(key=lambda n: n.endswith("-switch"))
    kill_and_delete(stale)
    return stale


def _setns(path):
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns %s" % path)
    finally:
        os.close(fd)


class Host:
    """One machine of the bed: a namespace with `eth0` at `ip`."""

    def __init__(self, bed, name, ns, ip, port_name):
        self.bed, self.name, self.ns, self.ip = bed, name, ns, ip
        self.port_name = port_name      # the switch end of its link
        self.procs = []

    def __repr__(self):
        return "<host %s %s>" % (self.name, self.ip)

    def argv(self, argv):
        return ["ip", "netns", "exec", self.ns] + [str(a) for a in argv]

    def spawn(self, name, argv, logdir, env=None):
        """Start `argv` inside this host; the Proc's pid is the program's own."""
        proc = Proc("%s-%s" % (self.name, name), self.argv(argv), logdir, env=env).start()
        self.procs.append(proc)
        return proc

    def run(self, argv, timeout=60, **kw):
        """Run `argv` inside this host to completion (subprocess.run, output captured)."""
        return subprocess.run(self.argv(argv), capture_output=True, text=True,
                              timeout=timeout, **kw)

    def thread(self, target, *args, name=None):
        """A started daemon thread running target(*args) inside this namespace."""
        path = os.path.join(NETNS_DIR, self.ns)

        def enter_and_run():
            _setns(path)
            target(*args)

        t = threading.Thread(target=enter_and_run, name=name or "in-" + self.name, daemon=True)
        t.start()
        return t

    def call(self, fn, *args, timeout=120):
        """fn(*args) run inside this namespace; its result, or its exception raised."""
        box = {}

        def run():
            try:
                box["value"] = fn(*args)
            except BaseException as exc:   # handed to the caller's thread
                box["error"] = exc

        self.thread(run).join(timeout)
        if "error" in box:
            raise box["error"]
        if "value" not in box:
            raise AssertionError("%s: call of %r did not finish in %ss" % (self.name, fn, timeout))
        return box["value"]


class Bed:
    """A switch namespace with a bridge, and hosts joined to it.  See the module doc."""

    def __init__(self, subnet=SUBNET):
        reason = unavailable_reason()
        if reason:
            raise Unavailable(reason)
        sweep()
        _counter[0] += 1
        self.tag = "%s-%d-%d" % (PREFIX, os.getpid(), _counter[0])
        self.subnet = subnet
        self.hosts = {}
        self.closed = False
        self.switch = self.tag + "-switch"
        self._made = []
        atexit.register(self.close)
        try:
            self._netns_add(self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
        except subprocess.CalledProcessError as exc:
            self.close()
            raise Unavailable("cannot make a bridge in a network namespace: %s"
                              % (exc.stderr or exc).strip()) from None

    def _netns_add(self, ns):
        _ip("netns", "add", ns)
        self._made.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def add_host(self, name):
        """A new namespace joined to the bridge, with address SUBNET.(10 + n)."""
        assert re.match(r"^[a-z][a-z0-9]{0,9}$", name), "host names: short, [a-z0-9]"
        assert name not in self.hosts and not self.closed
        ns = "%s-%s" % (self.tag, name)
        ip = "%s.%d" % (self.subnet, 10 + len(self.hosts))
        port = "p-" + name
        self._netns_add(ns)
        _ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0",
            "netns", ns)
        _ip("-n", self.switch, "link", "set", port, "master", "br0")
        _ip("-n", self.switch, "link", "set", port, "up")
        _ip("-n", ns, "addr", "add", ip + "/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        host = self.hosts[name] = Host(self, name, ns, ip, port)
        return host

    def cut(self, host):
        """Partition `host` from every other: its switch port down."""
        _ip("-n", self.switch, "link", "set", host.port_name, "down")

    def restore(self, host):
        _ip("-n", self.switch, "link", "set", host.port_name, "up")

    def isolate(self, host, others):
        """A one-sided partition: `host` can no longer send to `others` (a blackhole
        route per address in its namespace: packets silently dropped), while every host
        still reaches it.  A worker host that lost its way to the queue tier but not to
        the load balancer, say."""
        for other in others:
            _ip("-n", host.ns, "route", "add", "blackhole", other.ip + "/32")

    def reconnect(self, host, others):
        for other in others:
            _ip("-n", host.ns, "route", "del", "blackhole", other.ip + "/32", check=False)

    def is_cut(self, host):
        out = _ip("-n", self.switch, "-o", "link", "show", host.port_name)
        return "UP" not in out.split("<", 1)[1].split(">", 1)[0].split(",")

    def stop_processes(self, timeout=5.0):
        """Stop every Proc a host spawned (SIGTERM, then SIGKILL), by its pid."""
        for host in self.hosts.values():
            for proc in host.procs:
                proc.stop(timeout=timeout)

    def close(self):
        """Kill what still runs inside, delete every namespace.  Idempotent."""
        if self.closed:
            return
        self.closed = True
        made = [ns for ns in self._made if ns != self.switch] + \
            [ns for ns in self._made if ns == self.switch]
        kill_and_delete(made)
        for host in self.hosts.values():       # reap our own children
            for proc in host.procs:
                if proc.popen is not None:
                    try:
                        proc.popen.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        pass
        try:
            atexit.unregister(self.close)
        except Exception:   # interpreter shutting down
            pass

    def leftovers(self):
        """Namespaces of this bed that still exist (a test checks there are none)."""
        mine = set(self._made)
        return [ns for ns in namespaces() if ns in mine]


_probe = {}


def unavailable_reason():
    """Why network namespaces cannot be made here, or None when they can."""
    if "reason" in _probe:
        return _probe["reason"]
    reason = None
    if os.geteuid() != 0:
        reason = "network namespaces need root (`ip netns add`); running as uid %d" % os.geteuid()
    elif not shutil.which("ip"):
        reason = "no `ip` command (iproute2) on PATH"
    else:
        ns = "%s-%d-0-probe" % (PREFIX, os.getpid())
        done = subprocess.run(["ip", "netns", "add", ns], capture_output=True, text=True,
                              timeout=20)
        if done.returncode != 0:
            reason = "cannot create a network namespace: %s" % done.stderr.strip()
        else:
            _ip("netns", "del", ns, check=False)
    _probe["reason"] = reason
    return reason
