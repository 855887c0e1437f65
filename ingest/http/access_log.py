"""The worker's access log: one JSON line per request, written whole.

What it records, by policy (docs/operations.md lists the personal data of every log):
time, the client address the worker believes (`ip`), the X-Forwarded-For header as it
arrived (`forwarded_for`, so a replay keeps the client addresses), method, path, status,
answer bytes, record counts and latency.  Never the query string or the body (they hold
the data and, for /import, `api_key`), and no request header but X-Forwarded-For (so no
Authorization).

What it must not do: fail a request because the log cannot be written, or interleave
lines from concurrent requests (one os.write per line on an O_APPEND descriptor).  It is
reopened once a rotation renamed the file away (the worker checks about once a second),
so a plain `mv` + wait rotates it, and logrotate's copytruncate works as well.
"""
import json
import logging
import os

log = logging.getLogger("ingest.http")

# Longest X-Forwarded-For kept in a line (a client may send any length).
MAX_FORWARDED_CHARS = 512


def access_line(environ, status, elapsed, clock, client_ip):
    """One JSON line: time, client IP, X-Forwarded-For, method, path, status, bytes,
    records, latency."""
    entry = {"time": round(clock(), 3), "ip": client_ip(environ),
             "forwarded_for": environ.get("HTTP_X_FORWARDED_FOR", "")[:MAX_FORWARDED_CHARS],
             "method": environ.get("REQUEST_METHOD", ""), "path": environ.get("PATH_INFO", ""),
             "status": status, "bytes": environ.get("ingest.bytes", 0),
             "accepted": environ.get("ingest.accepted", 0),
             "rejected": environ.get("ingest.rejected", 0),
             "latency_ms": round(elapsed * 1000, 3)}
    return (json.dumps(entry, separators=(",", ":")) + "\n").encode("utf-8", "replace")


class AccessLog:
    """A writer of whole lines: one os.write per request on an O_APPEND descriptor, so
    lines from concurrent requests never interleave and logrotate's copytruncate works."""

    def __init__(self, path):
        self.path = path
        self.fd = 2 if path == "-" else self._open()

    def _open(self):
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def __call__(self, line):
        try:
            os.write(self.fd, line)
        except OSError as exc:  # a full disk must not fail the request
            log.warning("access log write failed: %s", exc)

    def reopen_if_moved(self):
        """Reopen the path when the open file is no longer the one it names (renamed
        away by a rotation, or deleted)."""
        if self.fd == 2:
            return False
        try:
            moved = os.stat(self.path).st_ino != os.fstat(self.fd).st_ino
        except FileNotFoundError:
            moved = True
        except OSError:
            return False
        if not moved:
            return False
        try:
            fd = self._open()
        except OSError as exc:
            log.warning("access log %s cannot be reopened: %s", self.path, exc)
            return False
        old, self.fd = self.fd, fd
        os.close(old)
        return True


def open_access_log(path):
    """An AccessLog, or None when `path` is empty; '-' is stderr.  OSError when the file
    cannot be opened (the worker turns it into one line)."""
    if not path:
        return None
    return AccessLog(path)
