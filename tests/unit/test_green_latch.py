"""GreenLatch (ingest/wsgi_server.py), the one-shot event a request queued in
BatchingSink waits on: set before or after the wait, and a waiter killed or timed out
before the set.  Green threads on eventlet's hub, no sockets."""
import time
import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import eventlet

import pytest

from ingest.wsgi_server import GreenLatch


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
    eventlet.sleep(0)            # the waiter runs up to its wait
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
    eventlet.sleep(0)
    thread.kill()
    latch.set()                  # nothing to wake: no switch into the dead thread
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
