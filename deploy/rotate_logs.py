"""Rotate the access logs by size, with no cron and no logrotate: a program of the tree.

    python deploy/rotate_logs.py --pid-file NGINX_PID --max-bytes N --backups K FILE...

What it is for: supervisord rotates what it captures (every program's stdout and stderr,
and its own log), but nginx writes its access log itself, and so may the workers
(`INGEST_ACCESS_LOG=FILE`).  Every second this looks at each FILE; one past
`--max-bytes` is renamed to FILE.1 (FILE.1 to FILE.2 and so on, keeping `--backups`), and
nginx's master is sent USR1 so it reopens its logs.  Workers notice the rename
themselves within a second and reopen (ingest/http/access_log.py).  Lines written
between the rename and the reopen land at the end of FILE.1: none is lost.

What it must not do: signal anything but the nginx master named by the pid file (and
only if that process is nginx), touch files it was not given, or stay alive after
SIGTERM/SIGINT.
"""
import argparse
import os
import signal
import sys
import threading

CHECK_EVERY_S = 1.0   # a stat per file per second


def rotate(path, backups):
    """FILE -> FILE.1, shifting older ones up and dropping the oldest; True if rotated."""
    for n in range(backups - 1, 0, -1):
        older = "%s.%d" % (path, n)
        if os.path.exists(older):
            os.replace(older, "%s.%d" % (path, n + 1))
    try:
        os.replace(path, path + ".1")
    except FileNotFoundError:
        return False
    return True


def due(path, max_bytes):
    try:
        return os.path.getsize(path) >= max_bytes
    except OSError:
        return False


def nginx_master(pid_file):
    """The pid in `pid_file` when it is a live nginx process, else None."""
    try:
        with open(pid_file) as fh:
            pid = int(fh.read().strip())
        with open("/proc/%d/comm" % pid) as fh:
            return pid if fh.read().strip() == "nginx" else None
    except (OSError, ValueError):
        return None


def check(files, max_bytes, backups, pid_file):
    rotated = [path for path in files if due(path, max_bytes) and rotate(path, backups)]
    if rotated:
        pid = nginx_master(pid_file)
        if pid is not None:
            os.kill(pid, signal.SIGUSR1)     # nginx reopens its logs
        print("rotated %s (nginx %s)" % (", ".join(rotated),
                                         "told to reopen" if pid else "not running"),
              flush=True)
    return rotated


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pid-file", required=True)
    p.add_argument("--max-bytes", type=int, required=True)
    p.add_argument("--backups", type=int, default=5)
    p.add_argument("--every-s", type=float, default=CHECK_EVERY_S)
    p.add_argument("files", nargs="+")
    args = p.parse_args(argv)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    print("rotating %s past %d bytes, keeping %d" % (", ".join(args.files), args.max_bytes,
                                                     args.backups), flush=True)
    while not stop.is_set():
        try:
            check(args.files, args.max_bytes, args.backups, args.pid_file)
        except OSError as exc:
            print("rotation failed: %s" % exc, file=sys.stderr, flush=True)
        stop.wait(args.every_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
