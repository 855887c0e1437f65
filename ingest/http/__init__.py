"""The HTTP side of a worker as a plain WSGI application (no eventlet, no sockets).

    app.py         the pipeline: admit -> read -> decode -> clean -> route -> enqueue -> respond
    request.py     body, decompression, client IP, credentials
    answers.py     every answer shape and CORS; the one place errors become answers
    admin.py       /health, /ready, /metrics
    access_log.py  one JSON line per request
"""
import time


def make_app(settings, sink, clock=time.time, router=None, state=None, metrics=None,
             access_log=None, timer=time.perf_counter, pause=None):
    """The WSGI callable.  Nothing is created at import time; tests pass a MemorySink and
    a fixed clock.  `metrics` (ingest.metrics.Metrics) and `access_log` (a callable
    taking one line of bytes) are optional; `pause()` lets other requests run during a
    long one (the worker passes eventlet.sleep)."""
    from ingest.http.app import App
    return App(settings, sink, clock=clock, router=router, state=state, metrics=metrics,
               access_log=access_log, timer=timer, pause=pause)
