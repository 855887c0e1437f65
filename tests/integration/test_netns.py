"""The namespace test bed itself (testkit/netns.py): a partition is a partition, and the
bed leaves nothing behind: not when its run raises, not on Ctrl-C, and a run killed
with SIGKILL is swept by the next one."""
import signal
import socket
import subprocess
import sys
import threading

import pytest

from testkit import netns
from testkit.procs import ROOT, pid_alive, wait_until

SCRIPT = """
import os, signal, sys, time
# A shell that started the suite in the background leaves SIGINT ignored, and Python
# then keeps it so: restore Ctrl-C's behaviour before the test can send it.
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, %(root)r)
from testkit import netns
bed = netns.Bed()
host = bed.add_host("a")
proc = host.spawn("sleeper", ["sleep", "60"], %(logdir)r)
print(bed.switch, host.ns, proc.pid, flush=True)
how = sys.argv[1]
if how == "raise":
    raise RuntimeError("a failing test")
if how == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
sys.stdin.read()          # "interrupt": wait for SIGINT
"""


@pytest.fixture
def bed():
    try:
        b = netns.Bed()
    except netns.Unavailable as exc:
        pytest.skip("no network namespaces here: %s" % exc)
    yield b
    b.close()
    assert b.leftovers() == []


def run_script(tmp_path, how):
    """A separate Python process that makes a bed, starts `sleep` in a host, then ends
    as `how` says; returns (switch, host namespace, sleeper pid, the process)."""
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT % {"root": ROOT,
                                                            "logdir": str(tmp_path)}, how],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline().split()
    assert len(line) == 3, proc.stderr.read()
    return line[0], line[1], int(line[2]), proc


def alive(pid):
    return pid_alive(pid)


@pytest.mark.parametrize("how", ["raise", "interrupt"])
def test_the_bed_tears_itself_down_when_its_run_fails_or_is_interrupted(tmp_path, bed, how):
    switch, host_ns, sleeper, proc = run_script(tmp_path, how)
    if how == "interrupt":    # ("raise" may be tearing down already)
        assert {switch, host_ns} <= set(netns.namespaces()) and alive(sleeper)
        proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert not {switch, host_ns} & set(netns.namespaces())
    wait_until(lambda: not alive(sleeper), timeout=5, message="the sleeper killed")


def test_a_run_killed_outright_is_swept_by_the_next(tmp_path, bed):
    switch, host_ns, sleeper, proc = run_script(tmp_path, "kill")
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert {switch, host_ns} <= set(netns.namespaces()) and alive(sleeper)
    swept = netns.sweep()
    assert {switch, host_ns} <= set(swept)
    assert not {switch, host_ns} & set(netns.namespaces())
    wait_until(lambda: not alive(sleeper), timeout=5, message="the sleeper killed")
    assert bed.switch in netns.namespaces(), "the sweep took a live run's namespaces"


def test_cut_restore_and_isolate(tmp_path, bed):
    """A cut host's peers time out (no reset, no refusal) and reach it again after
    restore; an isolated host cannot send to the others while they reach it."""
    a, b = bed.add_host("a"), bed.add_host("b")
    listener = b.call(lambda: socket.create_server(("0.0.0.0", 7000)))
    accepting = threading.Event()

    def accept_forever():
        accepting.set()
        while True:
            try:
                listener.accept()[0].close()
            except OSError:
                return

    threading.Thread(target=accept_forever, daemon=True).start()
    accepting.wait(5)

    def connect(timeout=0.5):
        try:
            socket.create_connection((b.ip, 7000), timeout=timeout).close()
            return "ok"
        except socket.timeout:
            return "timeout"
        except OSError as exc:
            return exc.strerror

    try:
        assert a.call(connect) == "ok"
        bed.cut(b)
        assert bed.is_cut(b)
        assert a.call(connect) == "timeout"
        bed.restore(b)
        assert not bed.is_cut(b)
        assert a.call(connect, 3.0) == "ok"
        bed.isolate(a, [b])
        assert a.call(connect) != "ok"
        bed.reconnect(a, [b])
        assert a.call(connect) == "ok"
    finally:
        listener.close()
    # Nothing of the bed is in the caller's own namespace: no link, no address, no
    # route (so no traffic of the bed can leave through it).
    mine = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout + \
        subprocess.run(["ip", "route"], capture_output=True, text=True).stdout
    assert netns.SUBNET + "." not in mine, mine
    assert subprocess.run(["ip", "link", "show", a.port_name], capture_output=True).returncode
