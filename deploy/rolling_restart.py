"""Restart every worker slot of the running tree, one at a time, dropping no request.

    .venv/bin/python deploy/rolling_restart.py [--slots 0,2] [--ready-timeout-s 60]

Run it from the directory supervisord was started in (the checkout for `make run`), as
supervisorctl, with the tree's INGEST_* environment (the worker ports come from it; the
slots are the ingest-worker programs supervisord runs).  For new code, or a changed
INGEST_CONFIG file.

Per slot:
  0. wait until every other slot is in nginx's rotation (step 2 below; a slot that
     crashed meanwhile must be back first), so never two slots are out at once;
  1. stop the worker through supervisord: SIGTERM, so it drains.  It closes its listening
     socket at once (nginx's new connections are refused and go to another slot), shuts
     its idle keep-alive connections and closes, unanswered, any request that arrives on
     one after that (nothing stored; nginx sends it to another slot, proxy_next_upstream
     error ... non_idempotent); requests already in the worker finish and are answered;
  2. start it again, and wait until it is back in nginx's rotation: its /health answers
     as this slot with a new instance id (not the old process, not a foreign listener),
     its /ready answers 200, and nginx uses it again: it answered a request that came
     through nginx (its /metrics count one more request on an ingestion endpoint), or,
     without traffic, nginx's fail_timeout (1 s) is surely over, so nginx has not
     written the slot off when the next one goes down;
then the next slot.  When a slot does not come back, it stops there, says why, and leaves
the other slots alone (they still run the old code): exit status 1.

What it must not do: restart a slot before the previous one is back in nginx's rotation,
signal anything but through supervisord, or talk to anything but the local supervisord
socket and worker ports.
"""
import argparse
import http.client
import os
import sys
import time
import xmlrpc.client

import launch

# nginx's max_fails=1 fail_timeout=1s (launch.upstream_servers), plus a margin.
NGINX_FAIL_TIMEOUT_S = 1.0
BACK_IN_ROTATION_S = NGINX_FAIL_TIMEOUT_S + 1.5
POLL_S = 0.05


class Stopped(Exception):
    """The rollout stops here; the message says why."""


def supervisor(s):
    from supervisor.xmlrpc import SupervisorTransport
    transport = SupervisorTransport(None, None, "unix://" + os.path.join(s["var"],
                                                                         "supervisor.sock"))
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor


def program(slot):
    return "ingest-worker:ingest-worker_%02d" % slot


def identity(s, slot):
    kind, what = launch.classify_slot(s, slot)
    return what if kind == "worker" else None


def get(s, slot, path):
    conn = http.client.HTTPConnection(s["worker_host"], launch.worker_port(s, slot), timeout=2)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    except (OSError, http.client.HTTPException):
        return None, b""
    finally:
        conn.close()


def proxied_requests(s, slot):
    """Requests this worker answered on an ingestion endpoint (through nginx, in a tree)."""
    status, body = get(s, slot, "/metrics")
    total = 0
    for line in body.decode("utf-8", "replace").splitlines():
        if line.startswith("ingest_requests_total{") and 'endpoint="other"' not in line:
            total += float(line.rsplit(" ", 1)[1])
    return total if status == 200 else 0


class Rollout:
    """Restarts slots one by one; remembers which worker instances it has seen serving
    through nginx, so a slot is checked again only when its process changed."""

    def __init__(self, s, rpc, slots, ready_timeout_s, say):
        self.s, self.rpc, self.say = s, rpc, say
        self.slots = list(slots)            # every slot of the tree
        self.ready_timeout_s = ready_timeout_s
        self.in_rotation = {}        # slot -> instance id seen serving through nginx

    def wait_in_rotation(self, slots, old=None):
        """Wait until every slot of `slots` serves as itself and nginx uses it; `old`: an
        instance id that does not count (the process just stopped)."""
        s, first_seen = self.s, {}
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            for slot in slots:
                ident = identity(s, slot)
                if ident is None or ident["instance"] == old or get(s, slot, "/ready")[0] != 200:
                    first_seen.pop(slot, None)
                    continue
                if self.in_rotation.get(slot) == ident["instance"]:
                    continue
                now, served = time.monotonic(), proxied_requests(s, slot)
                since, before = first_seen.setdefault(slot, (now, served))
                if served > before or now - since >= BACK_IN_ROTATION_S:
                    self.in_rotation[slot] = ident["instance"]
            missing = [n for n in slots if n not in self.in_rotation or
                       self.in_rotation[n] != (identity(s, n) or {}).get("instance")]
            if not missing:
                return
            if time.monotonic() >= deadline:
                raise Stopped("slots %s not serving through nginx within %.0f s (their"
                              " logs say why; worker ports come from this INGEST_*"
                              " environment)" % (missing, self.ready_timeout_s))
            time.sleep(POLL_S)  # poll interval

    def restart(self, slot):
        s, rpc = self.s, self.rpc
        self.wait_in_rotation([n for n in self.slots if n != slot])
        old = identity(s, slot)
        started = time.monotonic()
        try:
            rpc.stopProcess(program(slot), True)         # SIGTERM: the worker drains
        except xmlrpc.client.Fault as fault:
            if "NOT_RUNNING" not in fault.faultString:
                raise Stopped("stopping %s: %s" % (program(slot), fault.faultString)) from None
        self.in_rotation.pop(slot, None)
        try:
            rpc.startProcess(program(slot), True)        # back to RUNNING (startsecs)
        except xmlrpc.client.Fault as fault:
            raise Stopped("starting %s: %s (see var/log/ingest-worker_%02d.log)"
                          % (program(slot), fault.faultString, slot)) from None
        self.wait_in_rotation([slot], old=old["instance"] if old else None)
        new = identity(s, slot) or {}
        self.say("slot %02d: pid %s -> %s, back in nginx's rotation after %.1f s"
                 % (slot, old["pid"] if old else "-", new.get("pid"),
                    time.monotonic() - started))


def main(argv=None, env=None, cwd=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slots", default=None, help="comma-separated slots (default: all)")
    p.add_argument("--ready-timeout-s", type=float, default=60.0,
                   help="how long a restarted worker may take to answer /ready")
    args = p.parse_args(argv)
    s = launch.settings(dict(os.environ if env is None else env), cwd or os.getcwd())

    def say(line):
        print(line, flush=True)

    rpc = supervisor(s)
    try:
        every = sorted(int(p["name"].rsplit("_", 1)[1]) for p in rpc.getAllProcessInfo()
                       if p["group"] == "ingest-worker")
    except OSError as exc:
        say("rolling restart: no supervisord at %s: %s" % (s["var"], exc))
        return 1
    slots = every if args.slots is None else [int(x) for x in args.slots.split(",") if x.strip()]
    rollout = Rollout(s, rpc, every, args.ready_timeout_s, say)
    started = time.monotonic()
    for n, slot in enumerate(slots):
        try:
            rollout.restart(slot)
        except (Stopped, OSError) as exc:
            say("rolling restart stopped at slot %02d: %s; slots %s were not touched"
                % (slot, exc, slots[n + 1:] or "none"))
            return 1
    say("rolling restart done: %d slots in %.1f s" % (len(slots), time.monotonic() - started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
