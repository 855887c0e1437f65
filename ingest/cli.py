"""The `ingest` command: argv -> one subcommand.

    ingest serve          one HTTP worker (ingest/worker.py)
    ingest queue          the bundled Kestrel-compatible queue server (ingest/queue/)
    ingest queue export   move a queue data directory's items into a cluster
    ingest consume QUEUE  reliable-read items, one JSON line each
    ingest stats          queue depths, totals and rates per server
    ingest spool forward  empty a spool directory into Kestrel
    ingest routes check   validate a routes file (the worker's own checks and messages)
    ingest --version      the version

eventlet's monkey patching happens here and only here, right before a subcommand that
runs green threads starts; every other module stays importable without eventlet.
Logging is set up here, once, the same way for every subcommand.
"""
import argparse
import logging
import sys

from ingest import __version__, config

LOG_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"


def _add_kestrel(p):
    p.add_argument("--kestrel", default=config.DEFAULT_KESTREL,
                   help="comma-separated Kestrel servers, host:port[,host:port...]"
                        " (default %s)" % config.DEFAULT_KESTREL)


def build_parser():
    parser = argparse.ArgumentParser(prog="ingest", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version="ingest " + __version__)
    sub = parser.add_subparsers(dest="command", required=True)
    config.WORKER.add_arguments(sub.add_parser(
        "serve", help="run one HTTP ingestion worker (eventlet raw WSGI)"))
    q = sub.add_parser("queue", help="run the bundled Kestrel-compatible queue server")
    config.QUEUE.add_arguments(q)
    ex = q.add_subparsers(dest="queue_command", metavar="export").add_parser(
        "export", help="move every item of a queue server's data directory (a lost host's"
                       " disk) into a cluster")
    ex.add_argument("--data", required=True, help="the data directory (a copy of it)")
    ex.add_argument("--kestrel", required=True, help="the cluster, host:port[,host:port...]")
    ex.add_argument("--connections", type=_positive, default=32,
                    help="reads open at once on the directory's queue server")
    ex.add_argument("--give-up-s", type=float, default=60.0,
                    help="stop when no cluster server stored items for this long")

    c = sub.add_parser("consume", help="reliable-read items from a queue, one JSON line each")
    c.add_argument("queue")
    _add_kestrel(c)
    c.add_argument("--max", type=int, default=None, help="stop after N items")
    c.add_argument("--timeout-ms", type=int, default=1000,
                   help="stop after this long without an item")
    c.add_argument("--peek", action="store_true", help="look at the head without removing")
    c.add_argument("--connections", type=_positive, default=1,
                   help="read over N connections at once: faster, items in no particular "
                        "order (default 1: queue order)")

    s = sub.add_parser("stats", help="every server: whether it answers, queue depths, totals"
                                     " and rates; exit 0 all answer, 3 some, 1 none")
    _add_kestrel(s)
    s.add_argument("--json", action="store_true")
    s.add_argument("--timeout-ms", type=_positive, default=1000,
                   help="how long each server may take to connect, and to answer")

    sp = sub.add_parser("spool", help="local spool tools")
    spsub = sp.add_subparsers(dest="spool_command", required=True)
    fw = spsub.add_parser("forward", help="forward a spool directory to Kestrel and empty it")
    fw.add_argument("dir")
    _add_kestrel(fw)
    fw.add_argument("--dead-letter-s", type=float, default=600.0,
                    help="a record every server refuses this long becomes a dead letter"
                         " (0 = only when its queue takes other records)")
    fw.add_argument("--dead-letters", action="store_true",
                    help="first put the dead letters back into the spool, to send again")

    rt = sub.add_parser("routes", help="routes file tools")
    rtsub = rt.add_subparsers(dest="routes_command", required=True)
    ck = rtsub.add_parser("check", help="validate a routes file as a worker would, before"
                                        " installing it")
    ck.add_argument("file")
    return parser


def _positive(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError("must be a positive integer, got %r" % text)
    return value


def kestrel_servers(text):
    """`h:p,h:p` -> ['h:p', ...], checked; a bad list ends the program with one line."""
    try:
        return list(config.servers(text))
    except ValueError as exc:
        raise SystemExit("ingest: --kestrel: %s" % exc) from None


def configure_logging():
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format=LOG_FORMAT)


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
        settings = config.from_args(config.WORKER, "serve", args)
        configure_logging()
        _import_eventlet()
        from ingest import worker
        return worker.serve(settings)
    if args.command == "queue" and args.queue_command == "export":
        from ingest.commands import queue_export
        return queue_export.export(args.data, kestrel_servers(args.kestrel),
                                   connections=args.connections, give_up_s=args.give_up_s)
    if args.command == "queue":
        settings = config.from_args(config.QUEUE, "queue", args)
        configure_logging()
        _import_eventlet()
        from ingest.queue import main as queue_main
        return queue_main.main(settings)
    if args.command == "consume":
        from ingest.commands import consume
        return consume.consume(args.queue, kestrel_servers(args.kestrel), max_items=args.max,
                               timeout_ms=args.timeout_ms, peek=args.peek,
                               connections=args.connections)
    if args.command == "stats":
        from ingest.commands import stats
        return stats.stats(kestrel_servers(args.kestrel), as_json=args.json,
                           timeout_ms=args.timeout_ms)
    if args.command == "spool":
        configure_logging()
        from ingest.commands import spool_forward
        return spool_forward.forward(args.dir, kestrel_servers(args.kestrel),
                                     dead_letter_s=args.dead_letter_s,
                                     requeue_dead=args.dead_letters)
    if args.command == "routes":
        from ingest.commands import routes_check
        return routes_check.check(args.file)
    return 2


if __name__ == "__main__":
    sys.exit(main())
