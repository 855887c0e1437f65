"""What BatchingSink waits and locks with in the worker, where its threads are green.

    GreenLatch   the one-shot event a request queued in BatchingSink waits on; set_all()
                 wakes every request of a write with one hub callback
    os_lock      an unpatched lock for critical sections that never wait or yield

What it must not do: switch into a green thread that is no longer waiting on the latch
that woke it, or leave a waiter unwoken because another one failed.  With
ingest/worker.py, ingest/wsgi_server.py, ingest/wsgi_exchange.py and ingest/queue/ it is
one of the places that touch eventlet.
"""
import eventlet.hubs
import eventlet.patcher
import greenlet


class GreenLatch:
    """A one-shot event for green threads: set() once, wait() by one green thread.

    PERF: BatchingSink makes one per queued request.  eventlet.event.Event costs ~0.4 us
    to create (a monkey-patched threading.Event ~2.6 us) and wakes its waiter through a
    function of its own scheduled on the hub; here there is no waiter set, and set_all()
    wakes a whole write's requests from one hub callback."""

    __slots__ = ("_waiter", "_set")

    def __init__(self):
        self._waiter = None     # the green thread in wait(), until it leaves wait()
        self._set = False

    def set(self):
        GreenLatch.set_all((self,))

    def is_set(self):
        return self._set

    @staticmethod
    def set_all(latches):
        """set() on each of `latches`, their waiters woken one after another by a single
        hub callback.

        PERF: BatchingSink wakes every request of a write at once; a timer (a Timer
        object, a heap push and pop, its call) per request was a fifth of the hub's
        Python calls under wrk's 100 connections."""
        waiting = []
        for latch in latches:
            latch._set = True
            if latch._waiter is not None:
                waiting.append(latch)
        if waiting:
            eventlet.hubs.get_hub().schedule_call_global(0, _wake_each, waiting)

    def wait(self):
        """Return once set() was called (at once if it was)."""
        while not self._set:
            self._waiter = greenlet.getcurrent()
            try:
                eventlet.hubs.get_hub().switch()
            finally:
                # Woken, killed or timed out: from now on a wake-up scheduled for this
                # wait must not switch into this green thread.
                self._waiter = None


def _wake_each(latches):
    """In the hub: run each latch's waiting green thread until it waits again, one after
    the other; one that left its wait meanwhile (killed, timed out) is skipped.  If one
    ends with an exception (the hub reports it), the others are woken by another call."""
    for i, latch in enumerate(latches):
        waiter = latch._waiter
        if waiter is None:
            continue
        try:
            waiter.switch()
        except BaseException:
            rest = latches[i + 1:]
            if rest:
                eventlet.hubs.get_hub().schedule_call_global(0, _wake_each, rest)
            raise


_os_thread = eventlet.patcher.original("_thread")


def os_lock():
    """A lock of the operating system's, unpatched: for green threads' critical sections
    that never wait or yield inside (BatchingSink's), where taking eventlet's green lock
    costs about ten Python calls and this one none.  A green thread that waited while
    holding it would block every other green thread trying to take it."""
    return _os_thread.allocate_lock()
