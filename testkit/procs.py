"""Start real processes on loopback for integration tests, wait by polling, clean up.

No sleeping to wait for something: every wait polls a condition until a deadline and
fails with the process's captured output.  Every process started here is stopped by its
own pid (terminate, then kill) when the test ends.
"""
import os
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port(host="127.0.0.1"):
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
        deadline = time.monotonic() + timeout
        while not port_open(host, port):
            if not self.alive():
                raise AssertionError("%s exited with %s before listening:\n%s"
                                     % (self.name, self.popen.returncode, self.output()))
            if time.monotonic() >= deadline:
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


def ingest_argv(*args):
    return [sys.executable, "-m", "ingest"] + [str(a) for a in args]


class QueueServer:
    """The bundled `ingest queue` on a free loopback port with its own data directory."""

    def __init__(self, tmp_path, sync_ms=0, extra=(), name="queue"):
        self.host = "127.0.0.1"
        self.port = free_port()
        self.data = os.path.join(str(tmp_path), name + "-data")
        os.makedirs(self.data, exist_ok=True)
        self.proc = Proc(name, ingest_argv("queue", "--host", self.host, "--port", self.port,
                                           "--data", self.data, "--sync-ms", sync_ms, *extra),
                         os.path.join(str(tmp_path), "logs"))

    @property
    def address(self):
        return "%s:%d" % (self.host, self.port)

    def start(self):
        self.proc.start().wait_port(self.host, self.port)
        return self

    def restart(self):
        self.proc.kill()
        return self.start()


class Worker:
    """One `ingest serve` on a free loopback port."""

    def __init__(self, tmp_path, kestrel, extra=(), name="worker", env=None):
        self.host = "127.0.0.1"
        self.port = free_port()
        self.proc = Proc(name, ingest_argv("serve", "--host", self.host, "--port", self.port,
                                           "--kestrel", kestrel, *extra),
                         os.path.join(str(tmp_path), "logs"), env=env)

    @property
    def url(self):
        return "http://%s:%d" % (self.host, self.port)

    def start(self):
        self.proc.start().wait_port(self.host, self.port)
        return self
