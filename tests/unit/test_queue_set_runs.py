"""The queue server's run-of-sets path (Connection._plain_sets, QueueServer.store_many,
Queue.add_many) does exactly what storing each set on its own does.

Each stream of commands (runs of plain sets mixed with malformed sets, other commands,
limited, fanout and read-behind queues), cut into random pieces as recv() would return
them, is fed to two servers: one as shipped, one whose run path always declines, so
that every set goes through do_set and Queue.add.  Replies, counters, queue contents
and the journal bytes must be the same.  No sockets: process() is driven as
Connection._loop drives it; journals live in a temporary directory.
"""
import os
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.kestrel.protocol import MAX_LINE_BYTES
from ingest.queue import connection as connection_module
from ingest.queue.connection import CloseConnection, Connection
from ingest.queue.options import ConfigSet
from ingest.queue.server import QueueServer

CONFIG = {"queues": {"small": {"max_items": 3}, "room": {"max_memory_bytes": 200},
                     "aged": {"max_age_ms": 5000}, "bytes": {"max_bytes": 100},
                     "full": {"max_items": 2, "discard_old_when_full": True},
                     "fan": {"max_item_bytes": 30}}}
MAX_ITEM_BYTES = 64     # items above it are discarded as they stream in (Connection.skip)
NOW = 1795662710.5


def set_command(queue, data, expiry=0, verb=b"set", sep=b" "):
    return sep.join([verb, queue, b"0", b"%d" % expiry, b"%d" % len(data)]) + b"\r\n" + \
        data + b"\r\n"


_data = st.binary(max_size=40) | st.sampled_from([b"", b"\r\n", b"set x 0 0 1\r\n", b"x" * 90])
# fan+copy: a name with a character that means something in a regular expression;
# the long one: a head past the length the run path makes a pattern for.
_queue = st.sampled_from([b"events", b"other", b"small", b"room", b"aged", b"fan", b"bytes",
                          b"full", b"fan+copy", b"q" * 260])
# 9223372036854776 s is past what a journal record can hold (ms in an int64).
_expiry = st.sampled_from([0, 0, 5, 9223372036854775, 9223372036854776])
# What may follow a run of sets to one queue: lines that start as the run's lines do but
# are not the same but for the length, malformed sets, other commands.
_TAILS = [
    lambda q, e, d: b"",
    lambda q, e, d: set_command(q, d, e, verb=b"SET"),
    lambda q, e, d: set_command(q, d, e)[:-2] + b"xx",                  # bad data chunk
    lambda q, e, d: b"set %s 0 %d %dx\r\n%s\r\n" % (q, e, len(d), d),
    lambda q, e, d: b"set %s x %d %d\r\n%s\r\n" % (q, e, len(d), d),
    lambda q, e, d: b"set %s 0 %d  %d\r\n%s\r\n" % (q, e, len(d), d),
    lambda q, e, d: b"set %s 0 %d %d\n%s\r\n" % (q, e, len(d), d),
    lambda q, e, d: b"set %s 0 %d 1 %d\r\n%s\r\n" % (q, e, len(d), d),
    lambda q, e, d: b"set %s 0 %d5 %d\r\n%s\r\n" % (q, e, len(d), d),
    lambda q, e, d: b"set %s 0 %d %d\r\n%s\r\n" % (q + b"x", e, len(d), d),
    lambda q, e, d: b"get %s\r\n" % q,
    lambda q, e, d: b"get %s/open\r\n" % q,
    lambda q, e, d: b"delete other\r\n",
    lambda q, e, d: b"version\r\n",
    lambda q, e, d: b"set  0 0 1\r\nx\r\n",
    lambda q, e, d: b"set bad/name 0 0 1\r\nx\r\n",
    lambda q, e, d: b"set %s 0 %d 0%d\r\r\n%s\r\n" % (q, e, len(d), d),
    lambda q, e, d: b"set %s 00 0%d %d\r\n%s\r\n" % (q, e, len(d), d),
    lambda q, e, d: b"set %s 0 %d %d\r\n%s\r\n" % (q, e + 10 ** 16, len(d), d),
    lambda q, e, d: b"set %s 0 %d %d\r\n%s\r\n" % (q, e, len(d) + 100, d + b"y" * 100),
    # the same set but for a length zero-padded past the longest line the server reads,
    # to the longest line it reads, and to one byte more
    lambda q, e, d: b"set %s 0 %d %0*d\r\n%s\r\n" % (q, e, MAX_LINE_BYTES, len(d), d),
    lambda q, e, d: _padded_set(q, e, d, MAX_LINE_BYTES),
    lambda q, e, d: _padded_set(q, e, d, MAX_LINE_BYTES + 1),
]


def _padded_set(queue, expiry, data, line_bytes):
    """A set whose line (its \r but not its \n) is `line_bytes` long: the length is
    zero-padded to make it so."""
    head = b"set %s 0 %d " % (queue, expiry)
    width = line_bytes - len(head) - 1
    return head + b"%0*d\r\n" % (width, len(data)) + data + b"\r\n"


@st.composite
def _run(draw):
    queue, expiry = draw(_queue), draw(_expiry)
    sets = b"".join(set_command(queue, d, expiry)
                    for d in draw(st.lists(_data, min_size=1, max_size=12)))
    return sets + draw(st.sampled_from(_TAILS))(queue, expiry, draw(_data))


_stream = st.lists(_run(), max_size=6)


def _server(data_dir):
    srv = QueueServer(data_dir, ConfigSet(CONFIG, MAX_ITEM_BYTES), 100)
    # No hub runs here: a deleted queue's descriptor is closed at once, not by a green
    # thread that would never run (the suite would run out of descriptors).
    srv.syncer.close_fd = os.close
    srv.queue(b"fan+copy")        # a fanout child: sets to `fan` are copied to it
    return srv


def _close(*servers):
    for srv in servers:
        for q in srv.queues.values():
            q.journal.close()


def _feed(srv, stream, cuts):
    """Drive Connection.process over `stream` cut at `cuts`, as _loop does: the replies."""
    conn = Connection(srv, None)
    replies, buf, need, last = [], b"", 1, 0
    for cut in sorted(set(cuts)) + [len(stream)]:
        piece = stream[last:cut]
        last = cut
        if conn.skip:
            piece = conn._discard(piece)
        buf += piece
        if not piece or len(buf) < need:
            continue
        try:
            pos, need = conn.process(buf)
        except CloseConnection:
            replies.extend(conn.out)
            break
        buf = buf[pos:]
        replies.extend(conn.out)
        conn.out.clear()
        srv.write_pending()
    return b"".join(bytes(r) for r in replies)


def _state(srv):
    queues = {}
    for name, q in sorted(srv.queues.items()):
        queues[name] = (list(q.items), q.bytes, q.mem_bytes, q.total_items,
                        q.backlog.items if q.backlog is not None else None,
                        b"".join(q.journal.pending), q.journal.size)
    return srv.counters, queues


@settings(max_examples=200, deadline=None)
@given(_stream, st.lists(st.integers(0, 2000), max_size=6))
def test_a_run_of_sets_is_stored_as_each_set_alone_would_be(stream, cuts):
    stream = b"".join(stream)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(connection_module.time, "time", lambda: NOW)
        with tempfile.TemporaryDirectory() as fast_dir, tempfile.TemporaryDirectory() as slow_dir:
            fast = _server(fast_dir)
            fast_replies = _feed(fast, stream, cuts)
            mp.setattr(Connection, "_plain_sets", lambda self, buf, pos, nl: (pos, 0))
            slow = _server(slow_dir)
            slow_replies = _feed(slow, stream, cuts)
            try:
                assert fast_replies == slow_replies
                assert _state(fast) == _state(slow)
            finally:
                _close(fast, slow)


def test_a_batch_is_taken_by_the_run_path_and_split_blocks_wait():
    """The run path is really taken (a test that compares it with itself could not
    fail), and a block cut by the end of what was received is stored once it is whole."""
    calls = []
    with pytest.MonkeyPatch.context() as mp, tempfile.TemporaryDirectory() as data_dir:
        real = Connection._plain_sets
        mp.setattr(Connection, "_plain_sets",
                   lambda self, *a: calls.append(a[1]) or real(self, *a))
        srv = _server(data_dir)
        batch = b"".join(set_command(b"events", b"item %d" % i) for i in range(50))
        replies = _feed(srv, batch, [len(batch) - 3])
        try:
            assert replies == b"STORED\r\n" * 50
            assert len(srv.queues["events"].items) == 50
            assert len(calls) == 2    # 49 sets in one run, then the last once it is whole
        finally:
            _close(srv)
