"""GreenLatch (ingest/green.py), the one-shot event a request queued in
BatchingSink waits on: set before or after the wait, a waiter killed or timed out before
the set, a whole write's latches set at once; and BatchingSink with it.  Green threads
on eventlet's hub, no sockets."""
import time
import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import eventlet
    import eventlet.hubs

import pytest

from ingest.green import GreenLatch, os_lock
from ingest.sinks import SinkUnavailable

# The worker runs monkey-patched: its BatchingSink's threading is green.  This test process
# is not, so the module is imported with green threading for the sink's tests.
BatchingSink = eventlet.import_patched("ingest.sinks.batching").BatchingSink


def until_waiting(*latches):
    """Let the hub run until each of `latches` has a green thread inside wait()."""
    deadline = time.monotonic() + 5
    while any(latch._waiter is None for latch in latches):
        assert time.monotonic() < deadline, "a waiter never reached its wait"
        eventlet.sleep(0)


def test_a_latch_set_before_the_wait_returns_at_once():
    latch = GreenLatch()
    latch.set()
    latch.wait()
    assert latch.is_set()


def test_a_waiter_wakes_after_the_set_and_not_before():
    latch, order = GreenLatch(), []

    def waiter():
        latch.wait()
        order.append("woke")

    thread = eventlet.spawn(waiter)
    until_waiting(latch)
    assert order == [] and not latch.is_set()
    latch.set()
    order.append("set returned")
    with eventlet.Timeout(5):
        thread.wait()
    assert order == ["set returned", "woke"]


def test_a_waiter_killed_before_the_set_is_not_switched_into():
    latch, woke = GreenLatch(), []

    def waiter():
        latch.wait()
        woke.append(True)

    thread = eventlet.spawn(waiter)
    until_waiting(latch)
    thread.kill()
    hub = eventlet.hubs.get_hub()
    timers = hub.get_timers_count()
    latch.set()                  # nothing to wake: no switch into the dead thread
    assert hub.get_timers_count() == timers       # nothing was scheduled
    eventlet.sleep(0)
    assert woke == [] and thread.dead


def test_a_set_after_the_wait_timed_out_does_not_wake_the_thread_elsewhere():
    """The thread gave up waiting (eventlet.Timeout) and now sleeps: the late set() must
    not switch into it, which would cut its sleep short."""
    latch, state = GreenLatch(), {}

    def waiter():
        with pytest.raises(eventlet.Timeout):
            with eventlet.Timeout(0.01):
                latch.wait()
        state["sleeping"] = started = time.monotonic()
        eventlet.sleep(0.3)
        state["slept"] = time.monotonic() - started

    thread = eventlet.spawn(waiter)
    deadline = time.monotonic() + 5
    while "sleeping" not in state:
        assert time.monotonic() < deadline
        eventlet.sleep(0.001)
    latch.set()
    with eventlet.Timeout(5):
        thread.wait()
    assert state["slept"] >= 0.3
    latch.wait()          # set: returns at once


def spawn_waiters(latches, then):
    """A green thread per latch that waits on it, then calls then(i); returned once each
    of them is inside its wait."""
    def waiter(i):
        latches[i].wait()
        then(i)

    threads = [eventlet.spawn(waiter, i) for i in range(len(latches))]
    until_waiting(*latches)
    return threads


def test_set_all_wakes_every_waiter_in_order_and_skips_the_gone():
    latches = [GreenLatch() for _ in range(4)]
    order = []
    threads = spawn_waiters(latches, order.append)
    threads[2].kill()                      # gave up before the set
    latches[3].set()                       # set earlier: its waiter is already scheduled
    GreenLatch.set_all(latches)
    with eventlet.Timeout(5):
        for i in (0, 1, 3):
            threads[i].wait()
    assert sorted(order) == [0, 1, 3] and order.index(0) < order.index(1)
    assert all(latch.is_set() for latch in latches)


def test_a_wake_scheduled_before_the_waiter_left_does_not_switch_into_it():
    """set() scheduled the wake-up, then the waiter left its wait another way (here an
    exception thrown into it) and sleeps: the wake-up must not cut that sleep short."""
    latch, state = GreenLatch(), {}

    class GiveUp(Exception):
        pass

    def waiter():
        with pytest.raises(GiveUp):
            latch.wait()
        started = time.monotonic()
        eventlet.sleep(0.3)
        state["slept"] = time.monotonic() - started

    thread = eventlet.spawn(waiter)
    until_waiting(latch)
    latch.set()
    thread.kill(GiveUp)
    with eventlet.Timeout(5):
        thread.wait()
    assert state["slept"] >= 0.3


def test_a_woken_thread_that_fails_does_not_strand_the_others():
    latches = [GreenLatch() for _ in range(3)]
    woke = []

    def woken(i):
        woke.append(i)
        if i == 0:
            raise RuntimeError("the first request's connection failed")

    threads = spawn_waiters(latches, woken)
    GreenLatch.set_all(latches)
    with eventlet.Timeout(5):
        for thread in threads[1:]:
            thread.wait()
    assert woke == [0, 1, 2]


class GatedSink:
    """An inner sink whose first put waits (green) for `gate`, so requests queue behind
    it; refuses the pairs whose payload is b"refuse"."""

    def __init__(self):
        self.puts = []
        self.gate = eventlet.Event()

    def put(self, pairs):
        self.puts.append(list(pairs))
        if len(self.puts) == 1:
            self.gate.wait()
        refused = [pair for pair in pairs if pair[1] == b"refuse"]
        if refused:
            raise SinkUnavailable("refused", None, refused)

    def ready(self):
        return True


@pytest.mark.parametrize("lock", [None, os_lock], ids=["green lock", "os lock"])
def test_requests_queued_behind_a_write_share_the_next_one_and_their_outcome(lock):
    sink = BatchingSink(GatedSink(), event_factory=GreenLatch, lock=lock and lock())
    outcome = {}

    def request(name, payload):
        try:
            sink.put([("events", payload)])
            outcome[name] = "stored"
        except SinkUnavailable as exc:
            outcome[name] = [pair[1] for pair in exc.remaining]

    threads = [eventlet.spawn(request, "first", b"a")]
    deadline = time.monotonic() + 5
    while not sink.inner.puts:                 # the first write is under way, held
        assert time.monotonic() < deadline
        eventlet.sleep(0)
    threads += [eventlet.spawn(request, name, payload) for name, payload in
                (("b", b"b"), ("refused", b"refuse"), ("c", b"c"))]
    while len(sink._queue) < 3:
        assert time.monotonic() < deadline
        eventlet.sleep(0)
    sink.inner.gate.send()
    with eventlet.Timeout(5):
        for thread in threads:
            thread.wait()
    sink.close()
    assert sink.inner.puts == [[("events", b"a")],
                               [("events", b"b"), ("events", b"refuse"), ("events", b"c")]]
    assert outcome == {"first": "stored", "b": "stored", "refused": [b"refuse"],
                       "c": "stored"}
