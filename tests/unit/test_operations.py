"""Operator-facing pieces without sockets: the strict address parser, settings errors,
`ingest --version` and `ingest routes check`, the last good routes copy, the spool's log
lines (with a fake clock), the access log's fields and reopening, /health and /ready
bodies without CORS, the launcher's rendering (capture sampling, down slots, operator
paths) and the log rotator.  Real files in tmp_path; no sockets, no eventlet.
"""
import importlib.util
import itertools
import json
import logging
import os
import sys

import pytest

from ingest import __version__, cli, config
from ingest.commands import routes_check
from ingest.http.access_log import access_line, open_access_log
from ingest.http.request import ClientIP
from ingest.kestrel import protocol
from ingest.routing import RoutesError, Router
from ingest.routing.last_good import FILENAME, LastGoodRoutes
from ingest.sinks.spool_log import SpoolNotices
from testkit.payloads import write_routes
from testkit.procs import ROOT

from .golden.harness import call, make


def load_deploy(name):
    spec = importlib.util.spec_from_file_location(
        "deploy_" + name, os.path.join(ROOT, "deploy", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


launch = load_deploy("launch")
rotate_logs = load_deploy("rotate_logs")
sys.path.insert(0, os.path.join(ROOT, "deploy"))   # rolling_restart imports launch
rolling = load_deploy("rolling_restart")


# ---- addresses and settings -----------------------------------------------------------

@pytest.mark.parametrize("bad, why", [
    ("http://127.0.0.1:22133", "no scheme (drop 'http://')"),
    ("a:1;b:2", "separate servers with ','"),
    ("::1:22133", "IPv6 goes in brackets"),
    ("user@h:1", "not a name or address"),
    ("h :1", "not a name or address"),
    ("h:1/q", "port must be a number from 1 to 65535"),
    ("h:\uff11", "port must be a number from 1 to 65535"),     # a full-width digit
    ("h:65536", "port must be a number from 1 to 65535"),
])
def test_the_one_address_parser_is_strict(bad, why):
    with pytest.raises(ValueError, match="is not a Kestrel server: .*" + why.replace("(", r"\(")
                       .replace(")", r"\)")):
        protocol.parse_servers(bad)


def test_the_parser_keeps_what_is_valid():
    assert protocol.parse_servers("kestrel-1.example:22133, [::1]:7,my_host:1") == [
        ("kestrel-1.example", 22133), ("::1", 7), ("my_host", 1)]


@pytest.mark.parametrize("flags, environ, source", [
    ({"kestrel": "http://h:1"}, {}, "--kestrel: 'http://h:1' is not a Kestrel server"),
    ({}, {"INGEST_KESTREL": "a:1;b:2"}, "INGEST_KESTREL: 'a:1;b:2'"),
    ({"port": "99999"}, {}, "--port: port must be a port from 1 to 65535"),
    ({}, {"INGEST_WORKER_PORT": "0"}, "INGEST_WORKER_PORT: port must be"),
    ({"max_in_flight": "0"}, {}, "--max-in-flight: max_in_flight must be positive"),
])
def test_bad_values_and_failed_checks_name_their_source(flags, environ, source):
    with pytest.raises(ValueError) as err:
        config.resolve(flags, environ=environ)
    assert str(err.value).startswith(source), str(err.value)


def test_the_deploy_table_checks_its_addresses_and_percentages():
    with pytest.raises(ValueError, match="INGEST_KESTREL: 'http://x:1'"):
        config.DEPLOY.resolve(environ={"INGEST_KESTREL": "http://x:1"})
    with pytest.raises(ValueError, match="INGEST_ACCESS_LOG_CAPTURE_PERCENT"):
        config.DEPLOY.resolve(environ={"INGEST_ACCESS_LOG_CAPTURE_PERCENT": "101"})
    assert config.DEPLOY.resolve(environ={"INGEST_KESTREL": "a:1, b:2"}).kestrel == "a:1,b:2"


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == "ingest %s\n" % __version__


def test_license_is_named_in_the_readme():
    with open(os.path.join(ROOT, "LICENSE"), encoding="utf-8") as fh:
        assert fh.readline().strip() == "MIT License"
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        assert "MIT License" in fh.read()


# ---- routes: check and the last good copy ---------------------------------------------

def test_routes_check_says_what_the_worker_says(tmp_path, capsys):
    path = write_routes(tmp_path / "r.json", {"tokens": {"a": {"track": "x/y"}}})
    assert routes_check.check(path) == 1
    err = capsys.readouterr().err
    with pytest.raises(RoutesError) as worker_error:
        Router(path)
    assert err == "ingest routes check: bad routes file: %s\n" % worker_error.value
    write_routes(path, {"tokens": {"a": {}, "b": {}}})
    assert routes_check.check(path) == 0
    assert capsys.readouterr().out == "%s: ok (2 tokens)\n" % path


def test_every_good_load_is_kept_and_a_refused_one_is_not(tmp_path):
    keeper = LastGoodRoutes(str(tmp_path))
    path = write_routes(tmp_path / "routes.json", {"tokens": {"a": {"track": "qa"}}})
    router = Router(path, loader=keeper.load)
    saved = (tmp_path / FILENAME).read_bytes()
    assert saved == open(path, "rb").read()
    with open(path, "w") as fh:
        fh.write('{"tokens": ')
    assert router.reload() is False
    assert (tmp_path / FILENAME).read_bytes() == saved
    assert sorted(os.listdir(tmp_path)) == ["routes.json", FILENAME]   # no snapshot left

    table, reason = keeper.fallback(RoutesError("routes.json:1:12: invalid JSON"))
    assert table.route("track", "a", 0) == "qa"
    assert reason.startswith("routes file refused (routes.json:1:12: invalid JSON); routing"
                             " with the last good table, saved ")


def test_no_copy_or_a_damaged_copy_is_no_fallback(tmp_path):
    keeper = LastGoodRoutes(str(tmp_path))
    with pytest.raises(RoutesError, match="no last good routes table in"):
        keeper.fallback(RoutesError("bad"))
    (tmp_path / FILENAME).write_bytes(b'{"tokens": {"a": {"track": "q"}}\xff')
    with pytest.raises(RoutesError, match="bad; and the last good copy is unusable: .*not UTF-8"):
        keeper.fallback(RoutesError("bad"))


# ---- the spool's log lines ------------------------------------------------------------

class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class FakeSpool:
    dir = "/spool/00"

    def size_bytes(self):
        return 1234


def test_spool_lines_are_rate_limited(caplog):
    clock = Clock()
    notices = SpoolNotices(FakeSpool(), every_s=10, clock=clock)
    caplog.set_level(logging.INFO, "ingest.spool")
    notices.primary_ok()                       # nothing spooled: silent
    for _ in range(50):
        notices.spooled(2, "no Kestrel server stored the records: refused")
        clock.now += 0.5                        # 25 s of spooling
    notices.primary_ok()
    notices.primary_ok()
    for n in (10, 60, 100):
        notices.forwarding(n)
        clock.now += 6
    notices.forwarded_all(100)
    notices.forwarded_all(100)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == ("spooling: no Kestrel server stored the records: refused; records are"
                        " written to the spool and forwarded when Kestrel takes them again"
                        " (1234 bytes in /spool/00)")
    assert [line.split(":")[0] for line in lines] == [
        "spooling", "still spooling after 10s", "still spooling after 20s",
        "stopped spooling after 25.0s", "forwarding", "forwarding complete"]
    assert "100 records were spooled meanwhile" in lines[3]
    assert lines[-1] == "forwarding complete: 100 records forwarded to Kestrel, the spool is empty"


# ---- access log -----------------------------------------------------------------------

def test_the_access_line_keeps_x_forwarded_for_and_never_the_query():
    env = {"REQUEST_METHOD": "POST", "PATH_INFO": "/import", "REMOTE_ADDR": "127.0.0.1",
           "QUERY_STRING": "api_key=SECRET&data=e30=", "HTTP_AUTHORIZATION": "Basic U0VDUkVU",
           "HTTP_X_FORWARDED_FOR": "198.51.100.7, 127.0.0.1"}
    line = access_line(env, 200, 0.001, lambda: 1.5, ClientIP(config.networks("127.0.0.0/8")))
    entry = json.loads(line)
    assert (entry["ip"], entry["forwarded_for"]) == ("198.51.100.7", "198.51.100.7, 127.0.0.1")
    assert b"SECRET" not in line and b"U0VDUkVU" not in line and b"e30" not in line


def test_the_access_log_reopens_after_a_rename(tmp_path):
    path = str(tmp_path / "access.log")
    log = open_access_log(path)
    log(b"one\n")
    assert log.reopen_if_moved() is False
    os.rename(path, path + ".1")
    log(b"two\n")                                 # still the old file, until the check
    assert log.reopen_if_moved() is True
    log(b"three\n")
    assert open(path + ".1").read() == "one\ntwo\n" and open(path).read() == "three\n"


# ---- /health and /ready ---------------------------------------------------------------

def test_health_names_the_worker_and_operator_paths_carry_no_cors():
    app, _ = make()
    app.state.identity = {"status": "ok", "service": "ingest", "slot": 3, "port": 8103,
                          "instance": "ab"}
    for path in ("/health", "/ready", "/health/"):
        r = call(app, "GET", path, headers={"Cookie": "x=1"})
        assert not [h for h in r.headers if h.startswith("access-control")], (path, r)
    assert json.loads(call(app, "GET", "/health").body)["slot"] == 3


def test_ready_says_why_it_is_degraded():
    app, sink = make()
    assert json.loads(call(app, "GET", "/ready").body) == {"status": "ready"}
    app.sink.ready = lambda: (True, "spooling (no Kestrel server answers: refused)")
    app.router.stale = "routes file refused (x); routing with the last good table"
    assert json.loads(call(app, "GET", "/ready").body) == {
        "status": "ready", "degraded": "spooling (no Kestrel server answers: refused);"
        " routes file refused (x); routing with the last good table"}


# ---- the launcher and the rotator -----------------------------------------------------

def tree_settings(tmp_path, **env):
    return launch.settings(dict({"INGEST_WORKERS": "3"}, **env), str(tmp_path))


def test_capture_sampling_renders_for_nginx():
    assert launch.capture_split(0) == "        * 0;"
    assert launch.capture_split(0.001) == "        * 0;"      # rounds to nothing: off
    assert launch.capture_split(12.5) == "        12.50% 1;\n        * 0;"
    assert launch.capture_split(100) == "        * 1;"


def test_rendered_config_keeps_operator_paths_private_and_marks_foreign_slots_down(tmp_path):
    s = tree_settings(tmp_path, INGEST_WORKER_BASE_PORT="9100", INGEST_STATUS_PORT="9099")
    with open(launch.TEMPLATE, encoding="utf-8") as fh:
        text = launch.render_nginx(fh.read(), s, down={1})
    assert "server 127.0.0.1:9101 down;" in text
    assert "server 127.0.0.1:9100 max_fails=1 fail_timeout=1s;" in text
    assert "location ~ ^/(metrics|ready|health)/*$" in text and "listen 127.0.0.1:9099;" in text
    assert "$request_body" not in text.split("log_format")[1].split(";")[0]
    assert "error_log stderr crit;" in text


def test_the_worker_slot_is_checked_by_identity(tmp_path):
    s = tree_settings(tmp_path, INGEST_WORKER_BASE_PORT="9100")
    assert launch.is_slot({"service": "ingest", "slot": 1, "port": 9101}, s, 1)
    assert not launch.is_slot({"service": "ingest", "slot": 0, "port": 9101}, s, 1)
    assert launch.worker_argv(s, 2)[-6:] == ["--slot", "2", "--kestrel", "127.0.0.1:22133",
                                             "--spool", str(tmp_path / "var" / "spool" / "02")]
    with pytest.raises(SystemExit, match="3 slots from port 65534 run past 65535"):
        tree_settings(tmp_path, INGEST_WORKER_BASE_PORT="65534")


def test_the_rotator_shifts_backups_and_keeps_the_newest(tmp_path):
    log = str(tmp_path / "access.log")
    for n in range(4):
        with open(log, "w") as fh:
            fh.write("generation %d\n" % n)
        assert rotate_logs.check([log], 5, 2, str(tmp_path / "no.pid")) == [log]
    assert sorted(os.listdir(tmp_path)) == ["access.log.1", "access.log.2"]
    assert open(log + ".1").read() == "generation 3\n"
    assert open(log + ".2").read() == "generation 2\n"
    with open(log, "w") as fh:
        fh.write("tiny")
    assert rotate_logs.check([log], 5, 2, str(tmp_path / "no.pid")) == []


class FakeSupervisor:
    def __init__(self):
        self.calls = []

    def getAllProcessInfo(self):
        return [{"group": "ingest-worker", "name": "ingest-worker_%02d" % n} for n in (0, 1)] + [
            {"group": "nginx", "name": "nginx"}]

    def stopProcess(self, name, wait):
        self.calls.append(("stop", name))

    def startProcess(self, name, wait):
        self.calls.append(("start", name))


def test_a_slot_that_does_not_come_back_stops_the_rollout(monkeypatch, tmp_path, capsys):
    """Slot 0's new process never answers as a new instance: the rollout stops there and
    leaves slot 1 alone."""
    rpc = FakeSupervisor()
    counter = itertools.count()
    monkeypatch.setattr(rolling, "supervisor", lambda s: rpc)
    monkeypatch.setattr(rolling, "identity", lambda s, slot: {"instance": "old-%d" % slot,
                                                              "pid": 10 + slot})
    monkeypatch.setattr(rolling, "get", lambda s, slot, path: (200, b""))
    monkeypatch.setattr(rolling, "proxied_requests", lambda s, slot: next(counter))
    code = rolling.main(["--ready-timeout-s", "0.3"], env={"INGEST_WORKERS": "2"},
                        cwd=str(tmp_path))
    out = capsys.readouterr().out
    assert code == 1 and rpc.calls == [("stop", "ingest-worker:ingest-worker_00"),
                                       ("start", "ingest-worker:ingest-worker_00")]
    assert out.startswith("rolling restart stopped at slot 00: slots [0] not serving through"
                          " nginx within 0 s"), out
    assert out.rstrip().endswith("slots [1] were not touched"), out
