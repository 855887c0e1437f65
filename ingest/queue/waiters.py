"""Waiting for an item without polling: blocked `get /t=` reads of the queue server.

What it is for: a connection whose get finds its queue empty parks its green thread in a
Waiter on the queue's list (consumers or peekers).  It resumes with one of
    WOKEN     an item arrived (a peek also gets the head it was woken for)
    TIMEOUT   its /t= ran out
    READABLE  its socket became readable (the peer closed, or sent more requests)
    GONE      its socket was closed under it
`item_arrived` and `queue_gone` are what a queue calls when an item reaches its head or
when it is deleted; the wake-ups run from the hub, after the current batch.

What it must not do: decide anything about queues or replies (store.py and
connection.py do), or wake a green thread twice (`done` makes stale timers harmless).
"""
from eventlet import hubs

WOKEN, TIMEOUT, READABLE, GONE = "woken", "timeout", "readable", "gone"


class Waiter:
    """One blocked `get /t=`: resumed by an add (WOKEN), its timer, or its socket."""

    __slots__ = ("glet", "peek", "done", "record")

    def __init__(self, glet, peek):
        self.glet, self.peek, self.done, self.record = glet, peek, False, None

    def fire(self, reason):
        # Runs in the hub.  `done` makes stale timers or wake-ups harmless.
        if not self.done:
            self.done = True
            self.glet.switch(reason)

    def readable(self, _fileno):
        if not self.done:
            self.glet.switch(READABLE)

    def closed(self, *_exc):
        self.fire(GONE)


def park(waiter, seconds, fileno):
    """Suspend the current green thread until woken, timed out, or (when `fileno` is not
    None) its socket is readable or closed.  Returns WOKEN, TIMEOUT, READABLE or GONE."""
    hub = hubs.get_hub()
    timer = hub.schedule_call_global(seconds, waiter.fire, TIMEOUT)
    listener = None
    if fileno is not None:
        listener = hub.add(hub.READ, fileno, waiter.readable, waiter.closed, _noop)
    try:
        return hub.switch()
    finally:
        if listener is not None:
            hub.remove(listener)
        timer.cancel()


def _noop(*_args):
    pass


def item_arrived(consumers, peekers, head):
    """An item is at the head: wake every blocked peek and one blocked consumer.

    Each peeker gets `head` as of now, even if the consumer woken with it runs first
    and takes it."""
    hub = hubs.get_hub()
    while peekers:
        waiter = peekers.popleft()
        waiter.record = head
        hub.schedule_call_global(0, waiter.fire, WOKEN)
    if consumers:
        hub.schedule_call_global(0, consumers.popleft().fire, WOKEN)


def queue_gone(consumers, peekers):
    """Wake everything blocked (the queue is gone); each will find it empty."""
    hub = hubs.get_hub()
    for waiters in (consumers, peekers):
        while waiters:
            hub.schedule_call_global(0, waiters.popleft().fire, WOKEN)
