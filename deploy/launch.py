"""Start one program of the production tree (queue, one worker slot, nginx) for supervisord.

What it is for: supervisord can only paste strings into a command line.  It cannot add a
slot number to a base port, fall back to a default when an environment variable is unset,
or render nginx.conf (nginx reads no environment variables).  supervisord.conf therefore
runs every program as `python deploy/launch.py <program> [slot]`; this module works out
ports and paths from the environment (the DEPLOY and QUEUE tables of ingest/config.py,
documented in docs/reference/settings.md), creates the directories under
var/, and then *replaces itself* with the real program (os.execv).  supervisord's pid is
then the program's pid, so its signals (TERM to drain, HUP to reload routes, QUIT/USR1 to
nginx) reach the program itself and nothing lingers between them.

What it must not do: stay running as a parent, connect anywhere but the local worker
ports (the nginx readiness wait below), or restate settings that `ingest serve` reads
itself (INGEST_* in ingest/config.py).  The worker limits nginx must match (body size,
request-line size) come from ingest/config.py's WORKER table on the same environment, so
the two sides cannot drift apart.

All runtime state lives under ./var of the directory supervisord was started from (the
checkout for `make run`); the integration test starts it from a temporary directory.

    python deploy/launch.py queue | worker SLOT | nginx | render-nginx
"""
import grp
import json
import os
import pwd
import shutil
import socket
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TEMPLATE = os.path.join(HERE, "nginx.conf")

# supervisord.conf's stopwaitsecs for the workers; their drain budget must stay below it.
STOPWAITSECS = 15


def _resolve(table, env):
    """One of ingest/config.py's tables resolved on this environment: the deployment's
    own knobs (DEPLOY), the bundled queue's (QUEUE), every worker's (WORKER), so nginx's
    limits and the queue address are read from the same place the programs read them."""
    from ingest import config
    try:
        return getattr(config, table).resolve(environ=env)
    except (OSError, ValueError) as exc:
        raise SystemExit("launch: bad setting: %s" % exc) from None


def settings(env, cwd):
    """Every value the launcher needs, resolved once from `env` (defaults filled in)."""
    worker = _resolve("WORKER", env)
    queue = _resolve("QUEUE", env)
    deploy = _resolve("DEPLOY", env)
    var = os.path.join(os.path.abspath(cwd), "var")
    return {
        "var": var,
        "log": os.path.join(var, "log"),
        "nginx_prefix": os.path.join(var, "nginx"),
        "workers": deploy.workers or os.cpu_count() or 1,
        "listen_host": deploy.listen,
        "listen_port": deploy.port,
        "worker_host": deploy.worker_host,
        "worker_base_port": deploy.worker_base_port,
        "queue_host": queue.host,
        "queue_port": queue.port,
        "queue_sync_ms": queue.sync_ms,
        "kestrel": deploy.kestrel or "%s:%d" % (queue.host, queue.port),
        "nginx": deploy.nginx or shutil.which("nginx") or "/usr/sbin/nginx",
        "nginx_wait_s": deploy.nginx_wait_s,
        "nginx_user": deploy.nginx_user,
        "max_body_bytes": worker.max_body_bytes,
        "max_request_line_bytes": worker.max_request_line_bytes,
        "drain_s": worker.drain_s,
    }


# ---- pure: argv and config text --------------------------------------------------------

def worker_port(s, slot):
    return s["worker_base_port"] + slot


def spool_dir(s, slot):
    return os.path.join(s["var"], "spool", "%02d" % slot)


def queue_argv(s, python=sys.executable):
    return [python, "-m", "ingest", "queue", "--host", s["queue_host"],
            "--port", str(s["queue_port"]), "--data", os.path.join(s["var"], "queue"),
            "--sync-ms", str(s["queue_sync_ms"])]


def worker_argv(s, slot, python=sys.executable):
    # --kestrel is passed explicitly so the bundled queue's port follows
    # INGEST_QUEUE_PORT; an operator's INGEST_KESTREL (a real cluster) wins over it.
    return [python, "-m", "ingest", "serve", "--host", s["worker_host"],
            "--port", str(worker_port(s, slot)), "--kestrel", s["kestrel"],
            "--spool", spool_dir(s, slot)]


def upstream_servers(s):
    """One `server` line per worker slot, so nginx can balance and retry between them."""
    # max_fails=1 fail_timeout=1s: one refused connection takes a dead slot out of
    # rotation for a second, about what supervisord needs to restart it.
    return "\n".join("        server %s:%d max_fails=1 fail_timeout=1s;"
                     % (s["worker_host"], worker_port(s, slot))
                     for slot in range(s["workers"]))


def user_directive(s, euid, owner):
    """`user NAME GROUP;` for a root master, else a comment (nginx ignores it unprivileged).

    nginx's worker processes reopen the access log themselves on USR1, so they must be
    able to reach var/log: by default they run as whoever owns var/.  `owner` is that
    (name, group) pair, looked up by the caller.
    """
    if euid != 0:
        return "# not started as root: worker processes keep this user"
    if s["nginx_user"]:
        return "user %s;" % s["nginx_user"]
    return "user %s %s;" % owner


def render_nginx(template, s, user="# (no user directive)"):
    """The template with every @@NAME@@ filled in; fails if one is left over."""
    values = {
        "USER": user,
        "PID": os.path.join(s["nginx_prefix"], "nginx.pid"),
        "TEMP": os.path.join(s["nginx_prefix"], "tmp"),
        "ACCESS_LOG": os.path.join(s["log"], "access.log"),
        "LISTEN": "%s:%d" % (s["listen_host"], s["listen_port"]),
        "UPSTREAM_SERVERS": upstream_servers(s),
        "MAX_BODY_BYTES": str(s["max_body_bytes"]),
        "MAX_REQUEST_LINE_BYTES": str(s["max_request_line_bytes"]),
        "BODY_TOO_LARGE": _error_body("body_too_large", "nginx"),
        "NO_WORKER": _error_body("no_worker"),
    }
    text = template
    for name, value in values.items():
        text = text.replace("@@%s@@" % name, value)
    if "@@" in text:
        start = text.index("@@")
        raise SystemExit("launch: unknown placeholder in %s: %s"
                         % (TEMPLATE, text[start:start + 40].splitlines()[0]))
    return text


def _error_body(reason, variant="message"):
    """nginx's own answers in the API's JSON shape, worded by the reasons catalogue."""
    from ingest import errors
    return json.dumps({"status": 0, "error": errors.message(reason, variant)},
                      separators=(",", ":"))


def nginx_conf_path(s):
    return os.path.join(s["nginx_prefix"], "nginx.conf")


def nginx_argv(s, test=False):
    # -e stderr: errors before the config is read go to supervisord's log, not to a
    # compiled-in /var/log/nginx path; -p keeps every relative path under var/nginx.
    argv = [s["nginx"], "-p", s["nginx_prefix"] + "/", "-c", nginx_conf_path(s), "-e", "stderr"]
    return argv + ["-t", "-q"] if test else argv


# ---- effects ---------------------------------------------------------------------------

def _listening(host, port):
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_for_workers(s, clock=time.monotonic):
    """Hold nginx back until every worker slot accepts connections (or the wait is up).

    Workers need a few seconds to import eventlet; an nginx that answered meanwhile would
    mark every slot failed and return 503s for a while after they came up.  Kept short
    of forever: past the deadline nginx starts anyway and its retries cover the rest.
    """
    deadline = clock() + s["nginx_wait_s"]
    waiting = [worker_port(s, slot) for slot in range(s["workers"])]
    while waiting:
        waiting = [p for p in waiting if not _listening(s["worker_host"], p)]
        if waiting and clock() >= deadline:
            sys.stderr.write("launch: starting nginx although worker ports %s are not "
                             "listening after %ds\n" % (waiting, s["nginx_wait_s"]))
            return False
        if waiting:
            time.sleep(0.05)  # poll interval
    return True


def make_dirs(s, *extra):
    for path in (s["log"], os.path.join(s["nginx_prefix"], "tmp")) + extra:
        os.makedirs(path, exist_ok=True)


def _owner(path):
    st = os.stat(path)
    try:
        return pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name
    except KeyError:  # no name for it: nginx takes numbers poorly, fall back to nobody
        return "nobody", "nogroup"


def write_nginx_conf(s):
    user = user_directive(s, os.geteuid(), _owner(s["var"]))
    with open(TEMPLATE, encoding="utf-8") as fh:
        text = render_nginx(fh.read(), s, user)
    path = nginx_conf_path(s)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)  # a HUP'd nginx never reads a half-written file
    return path


def _exec(argv, env=None):
    sys.stdout.flush()
    sys.stderr.flush()
    if env is None:
        os.execv(argv[0], argv)
    os.execve(argv[0], argv, env)


def _worker_env(env):
    # Flags win over INGEST_PORT/INGEST_HOST anyway, but INGEST_PORT here means nginx's
    # port; dropping it keeps the worker's printed settings free of a misleading value.
    return {k: v for k, v in env.items() if k not in ("INGEST_PORT", "INGEST_HOST")}


def main(argv=None, env=None, cwd=None):
    argv = sys.argv[1:] if argv is None else argv
    env = dict(os.environ if env is None else env)
    s = settings(env, cwd or os.getcwd())
    command = argv[0] if argv else ""
    if command == "queue":
        make_dirs(s, os.path.join(s["var"], "queue"))
        return _exec(queue_argv(s))
    if command == "worker" and len(argv) == 2 and argv[1].isdigit():
        slot = int(argv[1])
        if s["drain_s"] >= STOPWAITSECS:
            sys.stderr.write("launch: drain_s=%s is not below supervisord's stopwaitsecs=%d; "
                             "a draining worker will be SIGKILLed: raise stopwaitsecs\n"
                             % (s["drain_s"], STOPWAITSECS))
        make_dirs(s, spool_dir(s, slot))
        return _exec(worker_argv(s, slot), _worker_env(env))
    if command == "nginx":
        make_dirs(s)
        write_nginx_conf(s)
        wait_for_workers(s)
        return _exec(nginx_argv(s))
    if command == "render-nginx":
        # For operators: re-render after changing INGEST_* and check it, then
        # `supervisorctl signal HUP nginx` makes nginx load it without dropping requests.
        make_dirs(s)
        print(write_nginx_conf(s))
        return _exec(nginx_argv(s, test=True))
    sys.stderr.write(__doc__.rstrip().splitlines()[-1].strip() + "\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())
