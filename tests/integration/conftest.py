"""Fixtures that start real processes on loopback and stop them by pid afterwards."""
import subprocess

import pytest

from testkit.procs import QueueServer, Worker


@pytest.fixture
def queue_server(tmp_path):
    server = QueueServer(tmp_path).start()
    yield server
    server.proc.stop()


@pytest.fixture
def make_worker(tmp_path):
    started = []

    def make(kestrel, extra=(), name="worker", env=None):
        w = Worker(tmp_path, kestrel, extra=extra, name="%s%d" % (name, len(started)), env=env)
        started.append(w)
        return w.start()

    yield make
    for w in started:
        w.proc.stop()


@pytest.fixture
def worker(queue_server, make_worker):
    return make_worker(queue_server.address)


@pytest.fixture
def two_servers(tmp_path):
    """Two bundled queue servers, for cluster behaviour (failover, reads over servers)."""
    servers = [QueueServer(tmp_path, name="q%d" % i).start() for i in range(2)]
    yield servers
    for s in servers:
        s.proc.stop()


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MiB tmpfs (a disk that fills up); skips where mount is not permitted."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    run = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
                         capture_output=True)
    if run.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (%s)" % run.stderr.decode().strip())
    yield str(mnt)
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
