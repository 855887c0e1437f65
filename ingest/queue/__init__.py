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
    journal.py     record format and checks, the journal writer
    backlog.py     read-behind: the items only in the journal, read back in order
    replay.py      start-up: replay a journal within the memory bound; torn tails;
                   recovery of a damaged journal
    store.py       Queue: memory part + backlog, every change journaled
    waiters.py     blocked `get /t=` reads: parking a green thread, waking it
    syncer.py      fsync policy (periodic or group commit) in a worker thread
    readahead.py   reads backlogs back ahead of need, in a worker thread
    compactor.py   journal rewrites in the background, streamed
    server.py      QueueServer: the queues by name, fanout, counters, stats
    connection.py  one client connection: parse, execute, journal, reply
    main.py        `main(settings)`: lock, bind, load, listen, accept, signals, shutdown

In the queue server only this package uses eventlet (waiters, syncer, readahead,
compactor, server, connection, main); options, journal, backlog and replay are plain
Python, and store reaches eventlet only through waiters (and asks its owner, the
server, for read-ahead and rewrites).  The wire bytes come from ingest/kestrel/protocol.py.  Importing this package
imports nothing.
"""
