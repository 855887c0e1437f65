"""The baseline: a bare eventlet WSGI hello-world, the ceiling any eventlet worker can reach.

    python -m bench.hello [--host H] --port P

It answers every request with "1" (text/plain, with Content-Length, keep-alive) and
does nothing else: no parsing of the query or body beyond what eventlet.wsgi itself does.
Its throughput measured in the same run as the worker's gives the ratio the reports
state.  It must stay this bare; anything added here lowers the baseline and flatters the
worker.
"""
import argparse
import sys

BODY = b"1"
HEADERS = [("Content-Type", "text/plain"), ("Content-Length", "1")]


def app(environ, start_response):
    # eventlet reads (and discards) an unread request body itself before the next
    # request on a keep-alive connection, so POSTs need nothing here.
    start_response("200 OK", HEADERS)
    return [BODY]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.hello", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    import warnings
    warnings.simplefilter("ignore")  # eventlet's deprecation banner on import
    import eventlet
    import eventlet.wsgi
    sock = eventlet.listen((args.host, args.port), backlog=1024)
    eventlet.wsgi.server(sock, app, log_output=False, debug=False, keepalive=True,
                         max_size=10000)
    return 0


if __name__ == "__main__":
    sys.exit(main())
