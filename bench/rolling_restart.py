"""Restart every worker slot of a tree under steady load through nginx, and count answers.

    python -m bench.rolling_restart [--method command|recipe] [--workers 2]
        [--threads 8] [--pace-ms 6] [--kill-slot N] [--root CHECKOUT]

Starts the production tree (supervisord.conf) from a temporary directory on free ports
(testkit.tree), sends GET /track through nginx from `--threads` keep-alive clients (each
pausing `--pace-ms` between requests), and while they run restarts every slot:
`command` with deploy/rolling_restart.py, `recipe` with the loop docs/operations.md
used to give (supervisorctl restart, then poll the worker's /ready, next slot).
`--kill-slot N` also SIGKILLs slot N's worker first.  Prints requests answered, the
count of each status, non-2xx (connection failures included) and the restart's duration.
`--root` runs another checkout's tree and code (say, a worktree of an older commit that
shares this .venv), to compare.

It must only start processes on loopback in its temporary directory, and stop them all.
"""
import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from testkit.load import Load
from testkit.procs import ROOT, wait_until
from testkit.tree import Tree


def ready(tree, slot):
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d/ready" % tree.worker_port(slot),
                                    timeout=2) as resp:
            return resp.status == 200
    except (OSError, urllib.error.URLError):
        return False


def recipe(tree):
    """The old README loop: restart, poll the worker's own /ready, next slot."""
    for slot in range(tree.workers):
        tree.ctl("restart", "ingest-worker:ingest-worker_%02d" % slot)
        wait_until(lambda: ready(tree, slot), timeout=60, interval=0.2,
                   message="slot %d ready" % slot)
    return ""


def command(tree):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "deploy", "rolling_restart.py")],
                          cwd=tree.site, env=tree.env, capture_output=True, text=True,
                          timeout=300)
    if done.returncode != 0:
        raise SystemExit("rolling_restart.py failed:\n%s%s" % (done.stdout, done.stderr))
    return done.stdout


def run(method, workers, threads, pace_s, kill_slot=None, root=ROOT):
    """Run one measurement; returns (tree, Result, restart seconds, restart output)."""
    with tempfile.TemporaryDirectory(prefix="rolling-") as tmp:
        tree = Tree(tmp, workers, root=root)
        try:
            tree.start()
            load = Load("127.0.0.1", tree.http_port, threads=threads, max_requests=10 ** 9,
                        duration_s=600, pace_s=pace_s, prefix="rr").start()
            wait_until(lambda: load.result.acked_count >= 200, timeout=30,
                       message="warm-up traffic")
            started = time.monotonic()
            if kill_slot is not None:
                os.kill(tree.infos()["ingest-worker:ingest-worker_%02d" % kill_slot]["pid"],
                        signal.SIGKILL)
            out = (command if method == "command" else recipe)(tree)
            took = time.monotonic() - started
            settled = load.result.requests
            wait_until(lambda: load.result.requests >= settled + 200, timeout=30,
                       message="traffic after the restart")
            result = load.stop()
            return tree, result, took, out
        finally:
            tree.cleanup()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=("command", "recipe"), default="command")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--pace-ms", type=float, default=6.0)
    p.add_argument("--kill-slot", type=int, default=None)
    p.add_argument("--root", default=ROOT)
    args = p.parse_args(argv)
    _, result, took, out = run(args.method, args.workers, args.threads, args.pace_ms / 1000.0,
                               args.kill_slot, os.path.abspath(args.root))
    bad = result.requests - result.count(200)
    elapsed = result.finished - result.started
    print(out, end="")
    print("method=%s workers=%d requests=%d (%.0f/s over %.1f s) non-2xx=%d statuses=%s"
          " restart_s=%.1f" % (args.method, args.workers, result.requests,
                               result.requests / elapsed, elapsed, bad,
                               dict(sorted(result.statuses.items(), key=str)), took))
    return 0


if __name__ == "__main__":
    sys.exit(main())
