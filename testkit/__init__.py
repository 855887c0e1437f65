"""What the test suite (tests/) and the benchmarks (bench/) share.

    procs     start real processes on loopback, free ports, wait by polling, /proc figures
    queues    read back what landed on a Kestrel queue
    load      a threaded /track load driver that records every acknowledgement
    rawhttp   one HTTP request written byte for byte on a socket, the answer parsed strictly
    rawqueue  a raw memcache-protocol connection to a queue server, every reply byte visible
    payloads  what requests carry: compact JSON, base64 in its variants, Basic auth, routes files
    spoolfiles  old-format spool segments, frame offsets, flipped bytes (dirty disk faults)

It lives beside ingest/, tests/ and bench/ so that `python -m pytest` and
`python -m bench.<x>`, both run from the repository root, import it as `testkit`.
It is not part of the installed `ingest` package (setup.py packages ingest only) and
must not import tests/ or bench/; it may import `ingest`, as its callers do.
Nothing here sleeps to wait for a condition or talks to anything but loopback.
"""
