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

Before nginx starts, its ports must be free (else one line and exit 1 at once, so
supervisord reports the program as failing instead of RUNNING while nginx retries the
bind), and every worker slot must prove it is an ingest worker of this tree: its /health
names the slot and port (a foreign process on a slot port is left out of nginx's
rotation, loudly).  `preflight` is what `make run` checks before supervisord starts.

What it must not do: stay running as a parent, connect anywhere but the local worker
ports (the nginx readiness wait below), or restate settings that `ingest serve` reads
itself (INGEST_* in ingest/config.py).  The worker limits nginx must match (body size,
request-line size) come from ingest/config.py's WORKER table on the same environment, so
the two sides cannot drift apart.

All runtime state lives under ./var of the directory supervisord was started from (the
checkout for `make run`); the integration test starts it from a temporary directory.

    python deploy/launch.py queue | worker SLOT | nginx | logrotate | render-nginx | preflight
"""
import grp
import http.client
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
ROTATE_LOGS = os.path.join(HERE, "rotate_logs.py")

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
    workers = deploy.workers or os.cpu_count() or 1
    if deploy.worker_base_port + workers - 1 > 65535:
        raise SystemExit("launch: bad setting: INGEST_WORKER_BASE_PORT: %d slots from port %d"
                         " run past 65535" % (workers, deploy.worker_base_port))
    return {
        "var": var,
        "log": os.path.join(var, "log"),
        "nginx_prefix": os.path.join(var, "nginx"),
        "workers": workers,
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
        "status_host": deploy.status_listen,
        "status_port": deploy.status_port,
        "capture_percent": deploy.access_log_capture_percent,
        "access_log_max_bytes": int(deploy.access_log_max_mb * 1024 * 1024),
        "access_log_backups": deploy.access_log_backups,
        "worker_access_log": worker.access_log,
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
            "--port", str(worker_port(s, slot)), "--slot", str(slot), "--kestrel", s["kestrel"],
            "--spool", spool_dir(s, slot)]


def access_log_path(s):
    return os.path.join(s["log"], "access.log")


def rotate_argv(s, python=sys.executable):
    """The log rotator: nginx's access log, and the workers' access log when it is a file."""
    files = [access_log_path(s)]
    if s["worker_access_log"] not in (None, "", "-"):
        files.append(os.path.abspath(s["worker_access_log"]))
    return [python, ROTATE_LOGS, "--pid-file", os.path.join(s["nginx_prefix"], "nginx.pid"),
            "--max-bytes", str(s["access_log_max_bytes"]),
            "--backups", str(s["access_log_backups"])] + files


def upstream_servers(s, down=()):
    """One `server` line per worker slot, so nginx can balance and retry between them;
    the slots in `down` (held by a foreign process) are marked down."""
    # max_fails=1 fail_timeout=1s: one refused connection takes a dead slot out of
    # rotation for a second, about what supervisord needs to restart it.
    return "\n".join("        server %s:%d %s;"
                     % (s["worker_host"], worker_port(s, slot),
                        "down" if slot in down else "max_fails=1 fail_timeout=1s")
                     for slot in range(s["workers"]))


def capture_split(percent):
    """The body of nginx's split_clients that picks the requests whose query string and
    body the access log keeps (nginx takes percentages with two decimals)."""
    percent = round(percent, 2)
    if percent <= 0:
        return "        * 0;"
    if percent >= 100:
        return "        * 1;"
    return "        %.2f%% 1;\n        * 0;" % percent


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


def render_nginx(template, s, user="# (no user directive)", down=()):
    """The template with every @@NAME@@ filled in; fails if one is left over."""
    values = {
        "USER": user,
        "PID": os.path.join(s["nginx_prefix"], "nginx.pid"),
        "TEMP": os.path.join(s["nginx_prefix"], "tmp"),
        "ACCESS_LOG": access_log_path(s),
        "LISTEN": "%s:%d" % (s["listen_host"], s["listen_port"]),
        "STATUS_LISTEN": "%s:%d" % (s["status_host"], s["status_port"]),
        "CAPTURE_SPLIT": capture_split(s["capture_percent"]),
        "UPSTREAM_SERVERS": upstream_servers(s, down),
        "MAX_BODY_BYTES": str(s["max_body_bytes"]),
        "MAX_REQUEST_LINE_BYTES": str(s["max_request_line_bytes"]),
        "BODY_TOO_LARGE": _error_body("body_too_large", "nginx"),
        "NO_WORKER": _error_body("no_worker"),
        "NOT_FOUND": _error_body("not_found"),
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

def probe_worker(host, port, timeout=0.5):
    """What answers GET /health on a worker port: ("worker", identity dict), ("foreign",
    what it answered), ("silent", why: it accepts but does not answer) or (None, why:
    nothing listens)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/health")
        resp = conn.getresponse()
        body = resp.read(4096)
    except ConnectionRefusedError:
        return None, "not listening"
    except (OSError, http.client.HTTPException) as exc:
        return "silent", "no HTTP answer to GET /health (%s)" % (exc or type(exc).__name__)
    finally:
        conn.close()
    try:
        identity = json.loads(body)
    except ValueError:
        identity = None
    if resp.status == 200 and isinstance(identity, dict) and identity.get("service") == "ingest":
        return "worker", identity
    return "foreign", "HTTP %d %s, %r" % (resp.status, resp.getheader("Content-Type", ""),
                                         body[:60])


def is_slot(identity, s, slot):
    """Is this /health identity the worker of `slot` in this tree (slot and port match)?"""
    return identity.get("slot") == slot and identity.get("port") == worker_port(s, slot)


def classify_slot(s, slot):
    """("worker", identity), ("foreign", what) or (None/"silent", why) for one slot."""
    kind, what = probe_worker(s["worker_host"], worker_port(s, slot))
    if kind == "worker" and not is_slot(what, s, slot):
        return "foreign", "an ingest worker of slot %s, port %s (not this tree's slot %d)" % (
            what.get("slot"), what.get("port"), slot)
    return kind, what


def wait_for_workers(s, clock=time.monotonic):
    """Hold nginx back until every worker slot answers /health as itself (or the wait is
    up); returns {slot: what} for the slots held by something else.

    Workers need a few seconds to import eventlet; an nginx that answered meanwhile would
    mark every slot failed and return 503s for a while after they came up.  A port that
    answers, but not as this tree's worker of that slot, is foreign at once (its worker
    cannot bind while it is there); one that accepts but never answers is foreign at the
    deadline.  Kept short of forever: past the deadline nginx starts anyway and its
    retries cover slots that are merely late.
    """
    deadline = clock() + s["nginx_wait_s"]
    waiting, foreign, silent = set(range(s["workers"])), {}, {}
    while waiting:
        for slot in sorted(waiting):
            kind, what = classify_slot(s, slot)
            if kind in ("worker", "foreign"):
                waiting.discard(slot)
                silent.pop(slot, None)
                if kind == "foreign":
                    foreign[slot] = what
            elif kind == "silent":
                silent[slot] = what
        if waiting and clock() >= deadline:
            foreign.update(silent)
            late = sorted(waiting - set(silent))
            if late:
                sys.stderr.write("launch: starting nginx although worker slots %s do not answer"
                                 " after %ds\n" % (late, s["nginx_wait_s"]))
            break
        if waiting:
            time.sleep(0.05)  # poll interval
    for slot, what in sorted(foreign.items()):
        sys.stderr.write("launch: ERROR: port %d of worker slot %d is held by something that is"
                         " not this tree's ingest worker (%s); nginx leaves the slot out of"
                         " rotation.  Free the port, then restart the slot and re-render"
                         " (deploy/launch.py render-nginx; supervisorctl signal HUP nginx)\n"
                         % (worker_port(s, slot), slot, what))
    return foreign


def bind_error(host, port):
    """None when host:port can be bound now, else why not (strerror)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def listeners(s, nginx_only=False):
    """(what, variable, host, port) of every address the tree listens on."""
    out = [("nginx", "INGEST_PORT", s["listen_host"], s["listen_port"]),
           ("nginx's status listener", "INGEST_STATUS_PORT", s["status_host"], s["status_port"])]
    if not nginx_only:
        out.append(("the queue", "INGEST_QUEUE_PORT", s["queue_host"], s["queue_port"]))
        out += [("worker slot %d" % slot, "INGEST_WORKER_BASE_PORT", s["worker_host"],
                 worker_port(s, slot)) for slot in range(s["workers"])]
    return out


def busy_ports(s, nginx_only=False):
    """One line per address of the tree that cannot be bound now."""
    return ["%s:%d (%s, %s) cannot be used: %s; stop what holds it or choose another %s"
            % (host, port, what, var, err, var)
            for what, var, host, port in listeners(s, nginx_only)
            for err in [bind_error(host, port)] if err]


def make_dirs(s, *extra):
    for path in (s["log"], os.path.join(s["nginx_prefix"], "tmp")) + extra:
        os.makedirs(path, exist_ok=True)


def _owner(path):
    st = os.stat(path)
    try:
        return pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name
    except KeyError:  # no name for it: nginx takes numbers poorly, fall back to nobody
        return "nobody", "nogroup"


def write_nginx_conf(s, down=()):
    user = user_directive(s, os.geteuid(), _owner(s["var"]))
    with open(TEMPLATE, encoding="utf-8") as fh:
        text = render_nginx(fh.read(), s, user, down)
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


def foreign_slots(s):
    """{slot: what} of the slots a foreign process holds now (no waiting)."""
    out = {}
    for slot in range(s["workers"]):
        kind, what = classify_slot(s, slot)
        if kind in ("foreign", "silent"):
            out[slot] = what
    return out


def start_nginx(s):
    make_dirs(s)
    busy = busy_ports(s, nginx_only=True)
    if busy:
        # Fail at once: nginx itself would retry the bind for seconds, long enough for
        # supervisord to call it RUNNING, and then crash-loop.
        sys.stderr.write("".join("launch: nginx cannot start: %s\n" % line for line in busy))
        return 1
    write_nginx_conf(s, wait_for_workers(s))
    return _exec(nginx_argv(s))


def preflight(s):
    """What `make run` checks before starting supervisord: every port free, var/ writable."""
    problems = busy_ports(s)
    try:
        os.makedirs(s["log"], exist_ok=True)
        probe = os.path.join(s["var"], ".write-probe-%d" % os.getpid())
        with open(probe, "w") as fh:
            fh.write("ok")
        os.unlink(probe)
    except OSError as exc:
        problems.append("%s is not writable: %s" % (s["var"], exc.strerror or exc))
    for line in problems:
        sys.stderr.write("preflight: %s\n" % line)
    return 1 if problems else 0


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
        return start_nginx(s)
    if command == "logrotate":
        make_dirs(s)
        return _exec(rotate_argv(s))
    if command == "render-nginx":
        # For operators: re-render after changing INGEST_* and check it, then
        # `supervisorctl signal HUP nginx` makes nginx load it without dropping requests.
        make_dirs(s)
        print(write_nginx_conf(s, foreign_slots(s)))
        return _exec(nginx_argv(s, test=True))
    if command == "preflight":
        return preflight(s)
    sys.stderr.write(__doc__.rstrip().splitlines()[-1].strip() + "\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())
