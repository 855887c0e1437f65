"""Fixtures that start real processes on loopback and stop them by pid afterwards."""
import pytest

from tests.support.procs import QueueServer, Worker


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
