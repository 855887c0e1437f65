"""Load generator and benchmarks for the ingestion server (access-log replay, reports, plots).

Nothing in here is imported by the `ingest` package: bench/ is a separate program that
drives a server from the outside over loopback, or calls the WSGI app in-process for
microbenchmarks.  It must never send traffic anywhere but the URL it is given.
"""
