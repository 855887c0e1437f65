"""`ingest queue`: the bundled Kestrel-compatible durable queue server (memcache protocol).

One eventlet green thread per connection.  A connection reads big chunks, executes every
complete command in the buffer, then (1) writes the journal records of the whole batch
with one os.write per touched journal, (2) under --sync-ms 0 waits for one shared
(group-committed) fsync, (3) sends all replies with one sendall.  So a STORED is only
ever sent after the item is in the journal file: a process crash loses nothing, and an
OS crash loses at most one --sync-ms period (nothing with --sync-ms 0).

Rules that keep this correct: queue state only changes inside a connection's batch (or
its cleanup, or startup) and every change is journaled in memory order; the buffered
records are written before the green thread can yield (sendall, fsync wait, blocking
get), so journal order always equals memory order.

Modules, from the bottom up:
    options.py     per-queue options (frozen) and the JSON --config file
    journal.py     record format, replay of a journal file, the journal writer
    store.py       Queue: one queue in memory, every change journaled
    waiters.py     blocked `get /t=` reads: parking a green thread, waking it
    syncer.py      fsync policy (periodic or group commit) in a worker thread
    server.py      QueueServer: the queues by name, fanout, counters, stats
    connection.py  one client connection: parse, execute, journal, reply
    main.py        `main(settings)`: load, listen, accept, signals, shutdown

In the queue server only this package uses eventlet (waiters, syncer, server, connection,
main); options and journal are plain Python, and store reaches eventlet only through
waiters.  The wire bytes come from ingest/kestrel/protocol.py.  Importing this package
imports nothing.
"""
