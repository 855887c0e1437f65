"""Mixpanel-compatible event ingestion server with a bundled Kestrel-compatible queue.

One request, through the modules in order:

    http/app.py    admit the request, read it            (http/request.py)
    decode.py      data parameter -> raw records         (pure)
    clean.py       raw record -> clean record + token    (pure)
    routing/       (endpoint, token) -> queue, O(1)      (pure)
    encode.py      clean record -> queue item bytes      (pure)
    sinks/         enqueue: Kestrel, batched; the spool when Kestrel fails
    http/answers   respond: 1/0, verbose, JSONP, pixel, redirect, strict

Around it: errors.py (the reasons catalogue), config.py (every setting), worker.py (the
eventlet bootstrap of `ingest serve`), kestrel/ (protocol and client), queue/ (`ingest
queue`), commands/ (consume, stats, spool forward), metrics.py, reference.py.
"""

__version__ = "0.1.0"
