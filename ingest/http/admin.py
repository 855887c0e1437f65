"""Operator paths: /health (the process answers), /ready (it can store records now) and
/metrics (Prometheus text).  Plain WSGI: no eventlet.

What it must not do: report ready while the worker is draining or has nowhere to put
records, or do I/O of its own beyond the sink's readiness check.
"""
from ingest.errors import IngestError
from ingest.http import answers


def health(app, environ, start_response):
    return answers.respond(environ, start_response, 200, b'{"status":"ok"}', answers.JSON)


def ready(app, environ, start_response):
    sink = app.sink
    ok, why = sink.ready() if hasattr(sink, "ready") else (True, "")
    if app.state.draining:
        ok, why = False, "draining"
    if ok:
        return answers.respond(environ, start_response, 200, b'{"status":"ready"}', answers.JSON)
    return answers.respond(environ, start_response, 503,
                           answers.json_body({"status": "unavailable", "reason": why}),
                           answers.JSON, (("Retry-After", "1"),))


def metrics(app, environ, start_response):
    body, ctype = app.metrics.render()
    return answers.respond(environ, start_response, 200, body, ctype)


def operator_path(app, environ, start_response, path, method):
    """Anything that is not an endpoint: an operator path, a preflight, or 404."""
    trimmed = path.rstrip("/") or "/"
    if trimmed == "/health":
        return health(app, environ, start_response)
    if trimmed == "/ready":
        return ready(app, environ, start_response)
    if trimmed == "/metrics" and app.metrics is not None:
        return metrics(app, environ, start_response)
    if method == "OPTIONS":
        return answers.preflight(environ, start_response)
    return answers.error(environ, start_response, IngestError("not_found"))
