"""/metrics: Prometheus text with requests, records by queue, rejections by reason."""
import io

from ingest import config
from ingest.http import make_app
from ingest.http.app import AppState
from ingest.metrics import Metrics
from ingest.sinks.memory import MemorySink


def call(app, path, query=""):
    out = {}

    def start_response(status, headers):
        out["status"] = status

    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": query,
               "REMOTE_ADDR": "127.0.0.1", "wsgi.input": io.BytesIO(b"")}
    body = b"".join(app(environ, start_response))
    return out["status"], body


def test_rejections_appear_under_their_reason_label():
    state = AppState()
    metrics = Metrics(state=state)
    app = make_app(config.resolve({}, environ={}), MemorySink(), clock=lambda: 1.8e9,
                   state=state, metrics=metrics)
    data = '[{"event":"a","properties":{"token":"t"}},{"event":"b","properties":{}}]'
    assert call(app, "/track", "data=" + data)[1] == b"1"
    assert call(app, "/track", "data=%%%")[1] == b"0"
    status, text = call(app, "/metrics")
    assert status.startswith("200")
    text = text.decode()
    assert 'ingest_records_rejected_total{endpoint="track",reason="missing_token"} 1.0' in text
    assert 'ingest_records_rejected_total{endpoint="track",reason="invalid_base64"} 1.0' in text
    assert 'ingest_records_accepted_total{endpoint="track",queue="events"} 1.0' in text
    assert 'ingest_requests_total{endpoint="track",status="200"} 2.0' in text
    assert 'ingest_request_duration_seconds_count{endpoint="track"} 2.0' in text
    assert "ingest_requests_in_flight 0.0" in text


def test_access_log_line_has_the_request_facts():
    lines = []
    app = make_app(config.resolve({}, environ={}), MemorySink(), clock=lambda: 1.8e9,
                   access_log=lines.append)
    call(app, "/engage", 'data={"$token":"t","$distinct_id":"d","$set":{"a":1}}')
    import json
    entry = json.loads(lines[0])
    assert entry["path"] == "/engage" and entry["status"] == 200
    assert entry["accepted"] == 1 and entry["rejected"] == 0
    assert entry["ip"] == "127.0.0.1" and entry["method"] == "GET"
    assert entry["bytes"] == 1 and entry["latency_ms"] >= 0


def test_bodies_in_flight_are_capped_together():
    """A request whose body would push the bytes held by requests in flight past the cap
    gets 503 + Retry-After at once; alone, a request is always admitted."""
    import dataclasses
    settings = dataclasses.replace(config.resolve({}, environ={}), max_body_bytes_in_flight=100)
    state = AppState()
    answers = []

    class Reentrant(MemorySink):
        """While the first request is being stored, a second one arrives."""
        def put(self, pairs):
            if not answers:
                body = b"data=" + b'{"event":"e","properties":{"token":"t"}}'.ljust(60)
                answers.append(post(app, body))
            super().put(pairs)

    def post(app, body):
        out = {}

        def start_response(status, headers):
            out["status"], out["headers"] = status, dict(headers)

        environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/track", "QUERY_STRING": "",
                   "CONTENT_TYPE": "application/x-www-form-urlencoded",
                   "CONTENT_LENGTH": str(len(body)), "REMOTE_ADDR": "127.0.0.1",
                   "wsgi.input": io.BytesIO(body)}
        return out, b"".join(app(environ, start_response))

    app = make_app(settings, Reentrant(), clock=lambda: 1.8e9, state=state)
    first = post(app, b"data=" + b'{"event":"e","properties":{"token":"t"}}'.ljust(60))
    assert first[1] == b"1"
    (second, _body), = answers
    assert second["status"].startswith("503") and second["headers"]["Retry-After"] == "1"
    assert state.body_bytes == 0 and state.in_flight == 0
