"""Operator paths: /health (the process answers, and which worker it is), /ready (it can
store records now, and why it is degraded when it is) and /metrics (Prometheus text).
Plain WSGI: no eventlet.

They are for operators and their tools only: nginx's public listener answers 404 for
them (deploy/nginx.conf); scrape the worker ports.  They never carry CORS headers, so no
web page can read them from a visitor's browser.

What it must not do: report ready while the worker is draining or has nowhere to put
records, or do I/O of its own beyond the sink's readiness check.
"""
from ingest.errors import IngestError
from ingest.http import answers

_PLAIN_HEALTH = {"status": "ok"}


def _answer(environ, start_response, status, body, ctype=answers.JSON, extra=()):
    return answers.respond(environ, start_response, status, body, ctype, extra,
                           allow_cors=False)


def health(app, environ, start_response):
    """200 with the worker's identity: service, version, slot, port, pid, instance."""
    identity = getattr(app.state, "identity", None) or _PLAIN_HEALTH
    return _answer(environ, start_response, 200, answers.json_body(identity))


def degraded(app, why):
    """Why a ready worker is not in its normal state ("" when it is): spooling because
    no Kestrel server takes records, routing with the last good routes table."""
    reasons = [why] if why.startswith("spooling") else []
    stale = getattr(app.router, "stale", None)
    if stale:
        reasons.append(stale)
    return "; ".join(reasons)


def ready(app, environ, start_response):
    sink = app.sink
    ok, why = sink.ready() if hasattr(sink, "ready") else (True, "")
    if app.state.draining:
        ok, why = False, "draining"
    if ok:
        body = {"status": "ready"}
        note = degraded(app, why)
        if note:
            body["degraded"] = note
        return _answer(environ, start_response, 200, answers.json_body(body))
    return _answer(environ, start_response, 503,
                   answers.json_body({"status": "unavailable", "reason": why}),
                   extra=(("Retry-After", "1"),))


def metrics(app, environ, start_response):
    body, ctype = app.metrics.render()
    return _answer(environ, start_response, 200, body, ctype)


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
