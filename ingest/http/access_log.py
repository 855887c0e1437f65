"""The worker's access log: one JSON line per request, written whole.

What it must not do: fail a request because the log cannot be written, or interleave
lines from concurrent requests (one os.write per line on an O_APPEND descriptor).
"""
import json
import logging
import os

log = logging.getLogger("ingest.http")


def access_line(environ, status, elapsed, clock, client_ip):
    """One JSON line: time, client IP, method, path, status, bytes, records, latency."""
    entry = {"time": round(clock(), 3), "ip": client_ip(environ),
             "method": environ.get("REQUEST_METHOD", ""), "path": environ.get("PATH_INFO", ""),
             "status": status, "bytes": environ.get("ingest.bytes", 0),
             "accepted": environ.get("ingest.accepted", 0),
             "rejected": environ.get("ingest.rejected", 0),
             "latency_ms": round(elapsed * 1000, 3)}
    return (json.dumps(entry, separators=(",", ":")) + "\n").encode("utf-8", "replace")


def open_access_log(path):
    """A writer of whole lines: one os.write per request on an O_APPEND descriptor, so
    lines from concurrent requests never interleave and logrotate's copytruncate works.
    None when `path` is empty; '-' is stderr."""
    if not path:
        return None
    fd = 2 if path == "-" else os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(line):
        try:
            os.write(fd, line)
        except OSError as exc:  # a full disk must not fail the request
            log.warning("access log write failed: %s", exc)
    return write
