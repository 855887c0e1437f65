"""One frozen Settings object for `ingest serve`: flags > environment (INGEST_*) > file > defaults.

Nothing outside this module reads the environment.  Every field carries its unit in its
name; `describe()` prints the resolved settings once at start.
"""
import dataclasses
import ipaddress
import json
import os

from ingest.kestrel.protocol import DEFAULT_PORT

DEFAULT_KESTREL = "127.0.0.1:%d" % DEFAULT_PORT


def _servers(value):
    if isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = str(value).split(",")
    servers = tuple(s.strip() for s in items if s.strip())
    for s in servers:
        host, sep, port = s.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError("kestrel server %r is not host:port" % s)
    if not servers:
        raise ValueError("kestrel needs at least one host:port")
    return servers


def _networks(value):
    if isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = str(value).split(",")
    return tuple(ipaddress.ip_network(s.strip(), strict=False) for s in items if s.strip())


def _bool(value):
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("not a boolean: %r" % value)


def _opt_str(value):
    return None if value in (None, "") else str(value)


# name -> (parser, default, help).  Flags are --name-with-dashes; env is INGEST_NAME.
FIELDS = {
    "host": (str, "127.0.0.1", "address to listen on"),
    "port": (int, 8000, "port to listen on"),
    "reuse_port": (_bool, False, "set SO_REUSEPORT so several workers share one port"),
    "kestrel": (_servers, DEFAULT_KESTREL, "Kestrel servers, host:port[,host:port...]"),
    "kestrel_connect_timeout_ms": (int, 500, "connect timeout per Kestrel server"),
    "kestrel_timeout_ms": (int, 2000, "read/write timeout per Kestrel command"),
    "kestrel_retry_ms": (int, 1000, "how long a failed Kestrel server is skipped"),
    "kestrel_pool_size": (int, 64, "connections kept per Kestrel server"),
    "kestrel_writers": (int, 1, "writer threads batching concurrent requests into one Kestrel write"),
    "spool": (_opt_str, None, "spool directory: records go here when no Kestrel server takes them"),
    "spool_sync_ms": (int, 0, "spool fsync period; 0 = fsync before answering"),
    "spool_max_mb": (int, 1024, "spool size cap; beyond it requests get 503"),
    "routes": (_opt_str, None, "routing table file (JSON)"),
    "trusted_proxies": (_networks, "127.0.0.0/8,::1/128",
                        "peers whose X-Forwarded-For is believed (CIDRs)"),
    "max_request_line_bytes": (int, 65536, "longest request line (URL) accepted; longer: 414"),
    "max_header_bytes": (int, 16384, "largest single header line; larger: 400 from eventlet"),
    "max_headers": (int, 64, "most header lines per request (at most 99); more: 431"),
    "max_body_bytes": (int, 10 * 1024 * 1024, "largest request body; larger: 413"),
    "max_records": (int, 2000, "most records per request; more: 413"),
    "max_record_bytes": (int, 1024 * 1024, "largest record as JSON; larger: record rejected"),
    "max_properties": (int, 255, "most properties per record; more: record rejected"),
    "max_depth": (int, 20, "deepest nesting inside a record's properties; deeper: record rejected"),
    "max_string_chars": (int, 65536, "longest string value in a record; longer: record rejected"),
    "max_in_flight": (int, 1000, "requests handled at once per worker; more: 503"),
    "max_body_bytes_in_flight": (int, 256 * 1024 * 1024,
                                 "request bodies held at once per worker; more: 503"),
    "max_connections": (int, 4096, "open client connections per worker"),
    "keepalive_idle_s": (float, 75.0, "idle keep-alive connections are closed after this"),
    "read_timeout_s": (float, 30.0, "headers must arrive within this, and each body read"),
    "drain_s": (float, 10.0, "on SIGTERM, how long in-flight requests may take to finish"),
    "access_log": (_opt_str, None, "JSON-lines access log file ('-' = stderr)"),
}


def _describe(self):
    """One line of name=value pairs, printed once at start."""
    parts = []
    for f in dataclasses.fields(self):
        value = getattr(self, f.name)
        if isinstance(value, tuple):
            value = ",".join(str(v) for v in value)
        parts.append("%s=%s" % (f.name, value))
    return " ".join(parts)


# The frozen settings type, generated from FIELDS so names and defaults live in one place.
Settings = dataclasses.make_dataclass(
    "Settings",
    [(name, object, dataclasses.field(default=parse(default)))
     for name, (parse, default, _) in FIELDS.items()],
    frozen=True,
    namespace={"describe": _describe, "__module__": __name__},
)

# INGEST_PORT is the public port nginx listens on (deploy/, `make run`), so the worker's own
# host and port read these instead.
ENV_NAMES = {"host": "INGEST_WORKER_HOST", "port": "INGEST_WORKER_PORT"}


def env_name(name):
    return ENV_NAMES.get(name, "INGEST_" + name.upper())


def add_serve_arguments(parser):
    parser.add_argument("--config", default=None,
                        help="JSON file of settings (keys as below, with underscores)")
    for name, (_, default, help_text) in FIELDS.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None,
                            help="%s (default %s; env %s)" % (help_text, default, env_name(name)))


def resolve(flags=None, environ=None, config_file=None):
    """Build Settings from flag values (None = not given), the environment and a file."""
    flags = flags or {}
    environ = os.environ if environ is None else environ
    file_values = {}
    path = flags.get("config") or environ.get("INGEST_CONFIG") or config_file
    if path:
        with open(path, encoding="utf-8") as fh:
            file_values = json.load(fh)
        unknown = sorted(set(file_values) - set(FIELDS))
        if unknown:
            raise ValueError("%s: unknown settings %s" % (path, ", ".join(unknown)))
    values = {}
    for name, (parse, default, _) in FIELDS.items():
        env = env_name(name)
        if flags.get(name) is not None:
            raw, source = flags[name], "--" + name.replace("_", "-")
        elif environ.get(env) not in (None, ""):
            raw, source = environ[env], env
        elif name in file_values:
            raw, source = file_values[name], "%s:%s" % (path, name)
        else:
            raw, source = default, None
        try:
            values[name] = parse(raw)
        except (TypeError, ValueError) as exc:
            raise ValueError("%s: %s" % (source or name, exc)) from None
    settings = Settings(**values)
    _validate(settings)
    return settings


def _validate(s):
    positive = ["port", "kestrel_connect_timeout_ms", "kestrel_timeout_ms", "kestrel_pool_size",
                "kestrel_writers", "spool_max_mb", "max_request_line_bytes", "max_header_bytes", "max_headers",
                "max_body_bytes", "max_records", "max_record_bytes", "max_properties",
                "max_depth", "max_string_chars", "max_in_flight", "max_body_bytes_in_flight", "max_connections"]
    for name in positive:
        if getattr(s, name) <= 0:
            raise ValueError("%s must be positive, not %r" % (name, getattr(s, name)))
    if s.max_headers > 99:
        raise ValueError("max_headers above 99 cannot take effect: the HTTP parser refuses"
                         " 100 header lines itself")
    for name in ("kestrel_retry_ms", "spool_sync_ms", "keepalive_idle_s", "read_timeout_s",
                 "drain_s"):
        if getattr(s, name) < 0:
            raise ValueError("%s must not be negative" % name)


def from_args(args):
    try:
        return resolve(vars(args))
    except (OSError, ValueError) as exc:
        raise SystemExit("ingest serve: bad setting: %s" % exc)
