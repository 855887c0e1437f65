"""Start real processes on loopback for tests and benchmarks, wait by polling, clean up.

No sleeping to wait for something: every wait polls a condition until a deadline and
fails with the process's captured output.  Every process started here is stopped by its
own pid (terminate, then kill): by the test or benchmark that started it, or by
`Proc.wait_port` itself when the process never starts listening.  Nothing here binds or
connects anywhere but the loopback address it is given.
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOOPBACK = "127.0.0.1"


def free_port(host=LOOPBACK):
    """A port that was free a moment ago (bind 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout=10.0, interval=0.01, message="condition"):
    """Poll `predicate` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError("timed out after %.1fs waiting for %s" % (timeout, message))
        time.sleep(interval)  # poll interval, not a wait for the condition itself


def port_open(host, port):
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def ingest_argv(*args, quiet=False):
    """`python -m ingest ARGS` with this interpreter; `quiet` adds -W ignore, which keeps
    eventlet's deprecation banner out of a benchmark's logs."""
    flags = ["-W", "ignore"] if quiet else []
    return [sys.executable] + flags + ["-m", "ingest"] + [str(a) for a in args]


def pinned(cpu, argv):
    """`argv` run under `taskset -c cpu`; unchanged when cpu is None or taskset is missing."""
    if cpu is None or not shutil.which("taskset"):
        return list(argv)
    return ["taskset", "-c", str(cpu)] + list(argv)


def no_proxy_env():
    """This environment without proxy variables and with NO_PROXY for loopback, for child
    processes (node, Chromium) that would otherwise send loopback traffic to a proxy."""
    env = {k: v for k, v in os.environ.items()
           if k.upper() not in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")}
    env["NO_PROXY"] = "127.0.0.1,localhost"
    return env


def fill_disk(directory):
    """Write `directory`/filler until its file system is full; returns the file's path."""
    path = os.path.join(directory, "filler")
    with open(path, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError:
            pass
    return path


# ---- figures from /proc (Linux) ----------------------------------------------------------

def _status_kib(pid, field):
    with open("/proc/%d/status" % pid) as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError("no %s for pid %d" % (field, pid))


def rss_kib(pid):
    """The resident set size of `pid` in KiB (VmRSS)."""
    return _status_kib(pid, "VmRSS")


def peak_rss_kib(pid):
    """The highest resident set size `pid` has had, in KiB (VmHWM)."""
    return _status_kib(pid, "VmHWM")


def pid_alive(pid):
    """True while `pid` exists and is not a zombie waiting to be reaped."""
    try:
        with open("/proc/%d/stat" % pid) as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def open_fds(pid):
    """How many file descriptors `pid` has open (sockets included)."""
    return len(os.listdir("/proc/%d/fd" % pid))


def cpu_seconds(pid):
    """User + system CPU seconds `pid` has used so far (OSError once it is gone)."""
    with open("/proc/%d/stat" % pid) as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---- processes ---------------------------------------------------------------------------

class Proc:
    """One child process with its stdout/stderr captured to files under `logdir`."""

    def __init__(self, name, argv, logdir, env=None, cwd=None):
        self.name = name
        self.argv = list(argv)
        self.logdir = str(logdir)
        os.makedirs(self.logdir, exist_ok=True)
        self.env = dict(os.environ if env is None else env)
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.cwd = cwd or ROOT
        self.popen = None
        self.starts = 0

    @property
    def pid(self):
        return self.popen.pid

    def start(self):
        self.starts += 1
        base = os.path.join(self.logdir, "%s.%d" % (self.name, self.starts))
        self.out_path, self.err_path = base + ".out", base + ".err"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.popen = subprocess.Popen(self.argv, stdout=out, stderr=err, env=self.env,
                                          cwd=self.cwd, start_new_session=True)
        return self

    def output(self, limit=4000):
        text = []
        for path in (getattr(self, "out_path", None), getattr(self, "err_path", None)):
            if path and os.path.exists(path):
                with open(path, "rb") as fh:
                    text.append(fh.read()[-limit:].decode("utf-8", "replace"))
        return "\n".join(text)

    def alive(self):
        return self.popen is not None and self.popen.poll() is None

    def wait_port(self, host, port, timeout=15.0):
        """Poll until `host:port` accepts connections.  Fails (AssertionError with the
        captured output) when the process exits first or the deadline passes; in the
        second case the process is stopped first, so a failed start leaves nothing behind."""
        deadline = time.monotonic() + timeout
        while not port_open(host, port):
            if not self.alive():
                raise AssertionError("%s exited with %s before listening:\n%s"
                                     % (self.name, self.popen.returncode, self.output()))
            if time.monotonic() >= deadline:
                self.stop()
                raise AssertionError("%s not listening on %s:%s after %.0fs:\n%s"
                                     % (self.name, host, port, timeout, self.output()))
            time.sleep(0.01)  # poll interval
        return self

    def signal(self, signum):
        if self.alive():
            os.kill(self.popen.pid, signum)

    def kill(self):
        """SIGKILL and reap (a crash, as the failure tests need)."""
        if self.alive():
            os.kill(self.popen.pid, signal.SIGKILL)
        if self.popen is not None:
            self.popen.wait(timeout=10)

    def stop(self, timeout=10.0):
        """SIGTERM, wait up to `timeout`, then SIGKILL; returns the exit code."""
        if self.popen is None:
            return None
        if self.alive():
            self.popen.terminate()
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)
        return self.popen.returncode


class Server:
    """An `ingest` command listening on a free loopback port (QueueServer, Worker).

    Logs go to `logdir` (default <tmp_path>/logs); `cpu` pins the process to that core
    (benchmarks); `quiet` passes -W ignore (see ingest_argv).
    """

    def __init__(self, tmp_path, name, command, args, env=None, cpu=None, quiet=False,
                 logdir=None):
        self.host = LOOPBACK
        self.port = free_port()
        argv = ingest_argv(command, "--host", self.host, "--port", self.port, *args, quiet=quiet)
        self.proc = Proc(name, pinned(cpu, argv),
                         logdir or os.path.join(str(tmp_path), "logs"), env=env)

    def start(self, timeout=15.0):
        self.proc.start().wait_port(self.host, self.port, timeout)
        return self


class QueueServer(Server):
    """The bundled `ingest queue` on a free loopback port with its own data directory."""

    def __init__(self, tmp_path, sync_ms=0, extra=(), name="queue", **options):
        self.data = os.path.join(str(tmp_path), name + "-data")
        os.makedirs(self.data, exist_ok=True)
        super().__init__(tmp_path, name, "queue",
                         ["--data", self.data, "--sync-ms", sync_ms] + list(extra), **options)

    @property
    def address(self):
        return "%s:%d" % (self.host, self.port)

    def restart(self):
        self.proc.kill()
        return self.start()


class Worker(Server):
    """One `ingest serve` on a free loopback port, writing to the Kestrel servers `kestrel`."""

    def __init__(self, tmp_path, kestrel, extra=(), name="worker", env=None, **options):
        super().__init__(tmp_path, name, "serve", ["--kestrel", kestrel] + list(extra),
                         env=env, **options)

    @property
    def url(self):
        return "http://%s:%d" % (self.host, self.port)

    def get(self, path):
        """(status, body) of GET `path` on this worker, error statuses included."""
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def metric(self, name):
        """The value of the label-less sample `name` at /metrics, or None."""
        for line in self.get("/metrics")[1].decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return None
