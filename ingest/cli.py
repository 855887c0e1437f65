"""The `ingest` command: `serve`, `queue`, `consume`, `stats`, `spool forward`.

eventlet's monkey patching happens here and only here, right before a subcommand that
runs green threads starts; every other module stays importable without eventlet.
"""
import argparse
import sys

from ingest.config import DEFAULT_KESTREL
from ingest.kestrel.protocol import DEFAULT_PORT


def _add_kestrel(p, required=False):
    p.add_argument("--kestrel", default=None if required else None, required=required,
                   help="comma-separated Kestrel servers, host:port[,host:port...]"
                        " (default %s)" % DEFAULT_KESTREL)


def build_parser():
    parser = argparse.ArgumentParser(prog="ingest", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    from ingest import config
    config.add_serve_arguments(sub.add_parser(
        "serve", help="run one HTTP ingestion worker (eventlet raw WSGI)"))

    q = sub.add_parser("queue", help="run the bundled Kestrel-compatible queue server")
    q.add_argument("--host", default="127.0.0.1")
    q.add_argument("--port", type=int, default=DEFAULT_PORT)
    q.add_argument("--data", default="./var/queue", help="journal directory")
    q.add_argument("--sync-ms", type=int, default=100,
                   help="fsync period in ms; 0 = fsync before every reply (group commit)")
    q.add_argument("--config", default=None, help="per-queue settings file (see README)")
    q.add_argument("--max-item-bytes", type=int, default=None,
                   help="largest item accepted by default (bytes)")

    c = sub.add_parser("consume", help="reliable-read items from a queue, one JSON line each")
    c.add_argument("queue")
    _add_kestrel(c)
    c.add_argument("--max", type=int, default=None, help="stop after N items")
    c.add_argument("--timeout-ms", type=int, default=1000,
                   help="stop after this long without an item")
    c.add_argument("--peek", action="store_true", help="look at the head without removing")

    s = sub.add_parser("stats", help="queue depths, totals and rates per server")
    _add_kestrel(s)
    s.add_argument("--json", action="store_true")

    sp = sub.add_parser("spool", help="local spool tools")
    spsub = sp.add_subparsers(dest="spool_command", required=True)
    fw = spsub.add_parser("forward", help="forward a spool directory to Kestrel and empty it")
    fw.add_argument("dir")
    _add_kestrel(fw)
    return parser


def kestrel_servers(text):
    """`h:p,h:p` -> ['h:p', ...]; the default is the bundled queue on this machine."""
    servers = [s.strip() for s in (text or DEFAULT_KESTREL).split(",") if s.strip()]
    if not servers:
        raise SystemExit("ingest: --kestrel needs at least one host:port")
    return servers


def _import_eventlet():
    """Import and monkey-patch eventlet; its deprecation banner is noise for operators."""
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
        import eventlet
    eventlet.monkey_patch()


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        from ingest import config
        settings = config.from_args(args)
        _import_eventlet()
        from ingest import server
        return server.serve(settings)
    if args.command == "queue":
        _import_eventlet()
        from ingest.queue import main as queue_main
        return queue_main.main(args)
    if args.command == "consume":
        from ingest import tools
        return tools.consume(args.queue, kestrel_servers(args.kestrel), max_items=args.max,
                             timeout_ms=args.timeout_ms, peek=args.peek)
    if args.command == "stats":
        from ingest import tools
        return tools.stats(kestrel_servers(args.kestrel), as_json=args.json)
    if args.command == "spool":
        from ingest import spool
        return spool.forward_cli(args.dir, kestrel_servers(args.kestrel))
    return 2


if __name__ == "__main__":
    sys.exit(main())
