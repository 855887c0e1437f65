"""Routing: (endpoint, token) -> Kestrel queue, in O(1) per record.

    table.py        RoutingTable (the hot path), Router (holds the table, swaps it on reload)
    limiter.py      per-token GCRA buckets for the overflow lane
    routes_file.py  parsing and validation of the routes file
"""
from ingest.routing.limiter import MIN_GENERATION_S
from ingest.routing.routes_file import DEFAULT_QUEUES, ENDPOINTS, RoutesError
from ingest.routing.table import BLOCKED, Router, RoutingTable, default_table

__all__ = ["BLOCKED", "DEFAULT_QUEUES", "ENDPOINTS", "MIN_GENERATION_S", "Router",
           "RoutesError", "RoutingTable", "default_table"]
