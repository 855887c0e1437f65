"""Issue 9 on a real worker: /health, /ready, /metrics and the access log."""
import json
from urllib.parse import quote

from testkit.procs import wait_until


def get(worker, path):
    return worker.get(path)


def test_ready_follows_the_queue_server_while_health_stays_up(queue_server, make_worker):
    worker = make_worker(queue_server.address, extra=["--kestrel-retry-ms", "100"])
    status, body = get(worker, "/health")
    identity = json.loads(body)
    assert status == 200 and identity["status"] == "ok" and identity["port"] == worker.port
    assert get(worker, "/ready")[0] == 200

    queue_server.proc.kill()
    status, body = wait_until(lambda: (lambda r: r if r[0] == 503 else None)(get(worker, "/ready")),
                              timeout=10, message="/ready to turn 503")
    reason = json.loads(body)
    assert reason["status"] == "unavailable" and "Kestrel" in reason["reason"]
    assert get(worker, "/health")[0] == 200
    # Without a spool nothing can be acknowledged: the SDK is told to retry.
    status, _ = get(worker, "/track?data=" + quote(json.dumps({"event": "e", "properties": {"token": "t"}})))
    assert status == 503

    queue_server.start()
    wait_until(lambda: get(worker, "/ready")[0] == 200, timeout=10, message="/ready to recover")


def test_metrics_and_access_log_on_a_real_worker(tmp_path, queue_server, make_worker):
    log_path = tmp_path / "access.log"
    worker = make_worker(queue_server.address, extra=["--access-log", log_path])
    data = quote(json.dumps([{"event": "e", "properties": {"token": "t"}}, {"event": "e"}]))
    assert get(worker, "/track?data=" + data) == (200, b"1")
    assert get(worker, "/nope")[0] == 404
    status, text = get(worker, "/metrics")
    text = text.decode()
    assert status == 200
    assert 'ingest_requests_total{endpoint="track",status="200"} 1.0' in text
    assert 'ingest_records_accepted_total{endpoint="track",queue="events"} 1.0' in text
    assert 'ingest_records_rejected_total{endpoint="track",reason="invalid_properties"} 1.0' in text
    assert 'ingest_kestrel_errors_total{server="%s"} 0.0' % queue_server.address in text
    assert 'ingest_request_duration_seconds_bucket{endpoint="track",le="+Inf"} 1.0' in text

    lines = wait_until(lambda: log_path.exists() and len(log_path.read_text().splitlines()) >= 3 and
                       log_path.read_text().splitlines(), timeout=5, message="access log lines")
    first = json.loads(lines[0])
    assert (first["method"], first["path"], first["status"]) == ("GET", "/track", 200)
    assert (first["accepted"], first["rejected"], first["ip"]) == (1, 1, "127.0.0.1")
    assert json.loads(lines[1])["status"] == 404
