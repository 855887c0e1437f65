"""Every setting of every program, as field tables resolved into frozen objects.

What it is for: one mechanism for three tables.  `WORKER` (`ingest serve`), `QUEUE`
(`ingest queue`) and `DEPLOY` (deploy/launch.py, environment only) are each a list of
`Field`s; `Table.resolve()` builds the table's frozen settings object with the
precedence flags > environment (INGEST_*) > settings file > defaults, and names the
source of a bad value.  docs/reference/settings.md is generated from these tables
(ingest/reference.py).

What it must not do: be read around.  Nothing outside this module reads the environment
for a setting; every field carries its unit in its name; `describe()` prints the resolved
settings once at start.
"""
import dataclasses
import ipaddress
import json
import os

from ingest.kestrel.protocol import DEFAULT_PORT, parse_servers

DEFAULT_KESTREL = "127.0.0.1:%d" % DEFAULT_PORT


# ---- parsers ----------------------------------------------------------------------------

def servers(value):
    """`h:p,h:p` (or a list) -> ('h:p', ...), checked by the one parser
    (ingest/kestrel/protocol.py): strictly host:port, port 1-65535, no scheme."""
    items = list(value) if isinstance(value, (list, tuple)) else str(value).split(",")
    entries = tuple(s.strip() for s in items if s.strip())
    parse_servers(entries)
    return entries


def optional_servers(value):
    return None if value in (None, "") else ",".join(servers(value))


def networks(value):
    items = list(value) if isinstance(value, (list, tuple)) else str(value).split(",")
    return tuple(ipaddress.ip_network(s.strip(), strict=False) for s in items if s.strip())


def boolean(value):
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("not a boolean: %r" % value)


def optional_str(value):
    return None if value in (None, "") else str(value)


def optional_int(value):
    return None if value in (None, "") else int(value)


# ---- checks, run on the resolved object (they see the field's name) ---------------------

def positive(name, value):
    if value <= 0:
        raise ValueError("%s must be positive, not %r" % (name, value))


def positive_if_set(name, value):
    if value is not None:
        positive(name, value)


def port_number(name, value):
    if not 0 < value < 65536:
        raise ValueError("%s must be a port from 1 to 65535, not %r" % (name, value))


def percent(name, value):
    if not 0 <= value <= 100:
        raise ValueError("%s must be from 0 to 100, not %r" % (name, value))


def not_negative(name, value):
    if value is not None and value < 0:
        raise ValueError("%s must not be negative" % name)


def _header_lines(name, value):
    positive(name, value)
    if value > 99:
        raise ValueError("max_headers above 99 cannot take effect: the HTTP parser refuses"
                         " 100 header lines itself")


class Field:
    """One setting: parser, default, meaning, its environment variable and its check."""

    __slots__ = ("name", "parse", "default", "help", "env", "check", "flag")

    def __init__(self, name, parse, default, help, env=None, check=None, flag=True):
        self.name = name
        self.parse = parse
        self.default = default
        self.help = help
        self.env = env
        self.check = check
        self.flag = flag

    @property
    def option(self):
        return "--" + self.name.replace("_", "-")


def _describe(self):
    """One line of name=value pairs, printed once at start."""
    parts = []
    for f in dataclasses.fields(self):
        value = getattr(self, f.name)
        if isinstance(value, tuple):
            value = ",".join(str(v) for v in value)
        parts.append("%s=%s" % (f.name, value))
    return " ".join(parts)


class Table:
    """A field table and the frozen settings type generated from it."""

    def __init__(self, type_name, fields, env_prefix, env_names=None, file_flag=None,
                 file_env=None):
        self.fields = {f.name: f for f in fields}
        for f in fields:
            f.env = f.env or (env_names or {}).get(f.name) or env_prefix + f.name.upper()
        self.file_flag = file_flag        # settings-file option name (worker: "config")
        self.file_env = file_env
        self.type = dataclasses.make_dataclass(
            type_name, [(f.name, object, dataclasses.field(default=f.parse(f.default)))
                        for f in fields],
            frozen=True, namespace={"describe": _describe, "__module__": __name__})

    def add_arguments(self, parser):
        if self.file_flag:
            parser.add_argument("--" + self.file_flag, default=None,
                                help="JSON file of settings (keys as below, with underscores)")
        for f in self.fields.values():
            if f.flag:
                parser.add_argument(f.option, dest=f.name, default=None,
                                    help="%s (default %s; env %s)" % (f.help, f.default, f.env))

    def resolve(self, flags=None, environ=None, config_file=None):
        """The settings object from flag values (None = not given), the environment and
        a settings file; ValueError naming the flag, variable or file key at fault."""
        flags = flags or {}
        environ = os.environ if environ is None else environ
        path = (self.file_flag and flags.get(self.file_flag)) or \
            (self.file_env and environ.get(self.file_env)) or config_file
        file_values = self._read_file(path) if path else {}
        values, sources = {}, {}
        for name, f in self.fields.items():
            if f.flag and flags.get(name) is not None:
                raw, source = flags[name], f.option
            elif environ.get(f.env) not in (None, ""):
                raw, source = environ[f.env], f.env
            elif name in file_values:
                raw, source = file_values[name], "%s:%s" % (path, name)
            else:
                raw, source = f.default, None
            sources[name] = source or name
            try:
                values[name] = f.parse(raw)
            except (TypeError, ValueError) as exc:
                raise ValueError("%s: %s" % (sources[name], exc)) from None
        settings = self.type(**values)
        for name, f in self.fields.items():
            try:
                if f.check is not None:
                    f.check(name, getattr(settings, name))
            except ValueError as exc:
                raise ValueError("%s: %s" % (sources[name], exc)) from None
        return settings

    def _read_file(self, path):
        with open(path, encoding="utf-8") as fh:
            values = json.load(fh)
        unknown = sorted(set(values) - set(self.fields))
        if unknown:
            raise ValueError("%s: unknown settings %s" % (path, ", ".join(unknown)))
        return values


# ---- `ingest serve` ----------------------------------------------------------------------

WORKER = Table("WorkerSettings", [
    Field("host", str, "127.0.0.1", "address to listen on"),
    Field("port", int, 8000, "port to listen on", check=port_number),
    Field("slot", optional_int, None, "worker slot number, shown by /health so a launcher"
          " can tell this worker from any other listener", check=not_negative),
    Field("reuse_port", boolean, False, "set SO_REUSEPORT so several workers share one port"),
    Field("kestrel", servers, DEFAULT_KESTREL, "Kestrel servers, host:port[,host:port...]"),
    Field("kestrel_connect_timeout_ms", int, 500, "connect timeout per Kestrel server",
          check=positive),
    Field("kestrel_timeout_ms", int, 2000, "read/write timeout per Kestrel command",
          check=positive),
    Field("kestrel_retry_ms", int, 1000, "how long a failed Kestrel server is skipped",
          check=not_negative),
    Field("kestrel_pool_size", int, 64, "connections kept per Kestrel server", check=positive),
    Field("kestrel_writers", int, 1,
          "Kestrel writes in flight at once; concurrent requests queue into the next one",
          check=positive),
    Field("spool", optional_str, None,
          "spool directory: records go here when no Kestrel server takes them"),
    Field("spool_sync_ms", int, 0, "spool fsync period; 0 = fsync before answering",
          check=not_negative),
    Field("spool_max_mb", int, 1024, "spool size cap; beyond it requests get 503",
          check=positive),
    Field("spool_dead_letter_s", float, 600.0,
          "a spooled record every Kestrel server refuses (NOT_STORED) this long goes to a"
          " dead-letter file; 0 = only when its queue takes other records",
          check=not_negative),
    Field("routes", optional_str, None, "routing table file (JSON)"),
    Field("trusted_proxies", networks, "127.0.0.0/8,::1/128",
          "peers whose X-Forwarded-For is believed (CIDRs)"),
    Field("max_request_line_bytes", int, 65536,
          "longest request line (URL) accepted; longer: 414", check=positive),
    Field("max_header_bytes", int, 16384,
          "largest single header line; larger: 400 from eventlet", check=positive),
    Field("max_headers", int, 64, "most header lines per request (at most 99); more: 431",
          check=_header_lines),
    Field("max_body_bytes", int, 10 * 1024 * 1024, "largest request body; larger: 413",
          check=positive),
    Field("max_decompressed_bytes", int, 4 * 1024 * 1024,
          "largest body after gzip/deflate is undone; larger: 413", check=positive),
    Field("max_records", int, 2000, "most records per request; more: 413", check=positive),
    Field("max_record_bytes", int, 1024 * 1024,
          "largest record as JSON; larger: record rejected", check=positive),
    Field("max_properties", int, 255, "most properties per record; more: record rejected",
          check=positive),
    Field("max_depth", int, 20,
          "deepest nesting inside a record's properties; deeper: record rejected",
          check=positive),
    Field("max_string_chars", int, 65536, "longest string value in a record; longer: record"
          " rejected", check=positive),
    Field("max_in_flight", int, 1000, "requests handled at once per worker; more: 503",
          check=positive),
    Field("max_body_bytes_in_flight", int, 32 * 1024 * 1024,
          "request bodies held at once per worker, counted decompressed as they arrive;"
          " more: 503", check=positive),
    Field("max_connections", int, 4096, "open client connections per worker", check=positive),
    Field("keepalive_idle_s", float, 75.0, "idle keep-alive connections are closed after this",
          check=not_negative),
    Field("read_timeout_s", float, 30.0,
          "a begun request line, and the headers, must arrive within this; and each body read",
          check=not_negative),
    Field("body_timeout_s", float, 30.0, "a request's whole body must arrive within this;"
          " later: 408 and the connection closed (0 = no limit)", check=not_negative),
    Field("drain_s", float, 10.0, "on SIGTERM, how long in-flight requests may take to finish",
          check=not_negative),
    Field("access_log", optional_str, None, "JSON-lines access log file ('-' = stderr)"),
    Field("profile_file", optional_str, None, "write a cProfile of the worker's run to this"
          " file when it stops (bench/wrk_bench.py --profile; slows the worker)"),
],
    # INGEST_PORT is the public port nginx listens on (deploy/, `make run`), so the
    # worker's own host and port read these instead.
    env_prefix="INGEST_", env_names={"host": "INGEST_WORKER_HOST", "port": "INGEST_WORKER_PORT"},
    file_flag="config", file_env="INGEST_CONFIG")

WorkerSettings = Settings = WORKER.type


def resolve(flags=None, environ=None, config_file=None):
    """The worker's settings (see Table.resolve)."""
    return WORKER.resolve(flags, environ, config_file)


# ---- `ingest queue` ----------------------------------------------------------------------

QUEUE = Table("QueueSettings", [
    Field("host", str, "127.0.0.1", "address to listen on"),
    Field("port", int, DEFAULT_PORT, "port to listen on", check=port_number),
    Field("data", str, "./var/queue", "journal directory"),
    Field("sync_ms", int, 100, "fsync period in ms; 0 = fsync before every reply"
          " (group commit)", check=not_negative),
    Field("config", optional_str, None, "per-queue settings file (JSON; docs/queue-server.md)"),
    Field("max_item_bytes", optional_int, None,
          "largest item accepted by default (bytes; default 16 MiB)", check=not_negative),
    Field("max_queues", int, 1000, "most queues; a set or get that would create one more is"
          " answered SERVER_ERROR", check=positive),
], env_prefix="INGEST_QUEUE_")

QueueSettings = QUEUE.type


# ---- deploy/launch.py: the production tree on one machine (environment only) ----------

DEPLOY = Table("DeploySettings", [
    Field("workers", optional_int, None,
          "worker slots; nginx's upstream lists this many (default: cores)", flag=False,
          check=positive_if_set),
    Field("port", int, 8080, "port nginx listens on", flag=False, check=port_number),
    Field("listen", str, "0.0.0.0", "address nginx listens on", flag=False),
    Field("worker_host", str, "127.0.0.1", "address the workers listen on (nginx is local)",
          flag=False),
    Field("worker_base_port", int, 8100, "worker slot N listens on this port + N", flag=False,
          check=port_number),
    Field("kestrel", optional_servers, None,
          "Kestrel servers for the workers (default: the bundled queue)", flag=False),
    Field("nginx", optional_str, None,
          "nginx binary (default: nginx on PATH, else /usr/sbin/nginx)", flag=False),
    Field("nginx_wait_s", int, 30, "at start, nginx waits this long for every worker port",
          flag=False, check=not_negative),
    Field("nginx_user", optional_str, None, "user for nginx's worker processes when started"
          " as root (default: the owner of var/)", flag=False),
    Field("status_listen", str, "127.0.0.1", "address of nginx's status listener (/ready and"
          " /health of a worker, for a load balancer's health check)", flag=False),
    Field("status_port", int, 8081, "port of nginx's status listener", flag=False,
          check=port_number),
    Field("access_log_capture_percent", float, 0.0, "share of requests whose query string"
          " and body nginx's access log keeps, api_key redacted (0 = none, 100 = all)",
          flag=False, check=percent),
    Field("access_log_max_mb", float, 100.0, "access logs (nginx's, and the workers' file)"
          " are rotated past this size", flag=False, check=positive),
    Field("access_log_backups", int, 5, "rotated access logs kept (.1 is the newest)",
          flag=False, check=positive),
], env_prefix="INGEST_")

DeploySettings = DEPLOY.type


def from_args(table, program, args):
    """Resolve `table` from parsed arguments; a bad value ends the program with one line
    naming it (exit status 2, as for a usage error), never a traceback."""
    try:
        return table.resolve(vars(args))
    except (OSError, ValueError) as exc:
        import sys
        sys.stderr.write("ingest %s: bad setting: %s\n" % (program, exc))
        raise SystemExit(2) from None
