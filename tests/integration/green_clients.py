"""Many eventlet green threads sharing one Kestrel client (run as a subprocess).

Usage: green_clients.py HOST:PORT[,HOST:PORT] WRITERS BATCHES ITEMS_PER_BATCH

Monkey-patches like `ingest serve` does, so the client's sockets are green; that is why it
runs in its own process and not inside pytest.  WRITERS green threads each send BATCHES
put_many calls of ITEMS_PER_BATCH unique items to queue `green`, then 40 green threads
reliable-read (`next`) until the queue stays empty.  Prints one JSON line of counts.
"""
import eventlet

eventlet.monkey_patch()

import collections  # noqa: E402  (after monkey patching, on purpose)
import json  # noqa: E402
import sys  # noqa: E402

from ingest.kestrel import Client  # noqa: E402

QUEUE = "green"
READERS = 40


def main(servers, writers, batches, per_batch):
    client = Client(servers)
    errors = []

    def write(w):
        try:
            for b in range(batches):
                client.put_many([(QUEUE, b"%d-%d-%d" % (w, b, i)) for i in range(per_batch)])
        except Exception as e:  # reported, and the test fails on it
            errors.append("writer %d: %r" % (w, e))

    pool = eventlet.GreenPool(writers + READERS)
    for w in range(writers):
        pool.spawn_n(write, w)
    pool.waitall()
    pooled_max = sum(len(s.idle) for s in client.cluster.servers)

    got = []

    def read(r):
        try:
            while True:
                item = client.next(QUEUE, timeout=300)
                if item is None:
                    return
                got.append(item)
        except Exception as e:
            errors.append("reader %d: %r" % (r, e))

    for r in range(READERS):
        pool.spawn_n(read, r)
    pool.waitall()
    open_left = len(client._open_reads)
    client.close()

    expected = {b"%d-%d-%d" % (w, b, i) for w in range(writers) for b in range(batches)
                for i in range(per_batch)}
    counts = collections.Counter(got)
    print(json.dumps({
        "written": len(expected), "read": len(got), "distinct": len(counts),
        "missing": len(expected - set(counts)),
        "duplicates": sum(1 for n in counts.values() if n > 1),
        "errors": errors[:10], "pooled_max": pooled_max, "open_reads_left": open_left}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])))
