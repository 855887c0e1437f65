"""Unit tests of the local spool (ingest/sinks/spool.py) and the sinks around it (ingest/sinks/).

Framing and torn tails, segment rotation, the size cap, group-commit fsync, the
forwarder's order / deletion / `.pos` progress against an in-memory put that can fail,
SpoolingSink and BatchingSink.  Real files in tmp_path and real threads; no sockets.
"""
import errno
import os
import threading
import time

import pytest

from ingest.sinks import SinkUnavailable
from ingest.sinks import frames
from ingest.sinks.batching import BatchingSink
from ingest.sinks.fallback import SpoolingSink
from ingest.sinks.forwarder import Forwarder
from ingest.sinks.frames import SEGMENT_HEADER_BYTES, encode_frame
from ingest.sinks.memory import MemorySink
from ingest.sinks.spool import Spool, SpoolFull
from testkit.procs import wait_until


def pairs(n, start=0, queue="events", size=0):
    return [(queue, b'{"n":%d%s}' % (i, b"," + b"x" * size if size else b""))
            for i in range(start, start + n)]


def seg_files(directory):
    return sorted(n for n in os.listdir(directory) if n.endswith(".seg"))


def read_frames(data):
    """(end, queue, payload) of every good frame of a segment's bytes."""
    segment = frames.open_segment(data)
    return [e[1:] for e in frames.scan(data, segment.body, segment.version)
            if e[0] is frames.FRAME]


def framed(records):
    """Bytes of one segment holding `records`, header included."""
    return SEGMENT_HEADER_BYTES + sum(len(encode_frame(q, p)) for q, p in records)


class FlakyPut:
    """An in-memory Kestrel: records what it 'stored'; fails when told to."""

    def __init__(self, fail_calls=()):
        self.stored = []
        self.calls = 0
        self.fail_calls = set(fail_calls)     # 1-based call numbers that fail
        self.failing = False

    def __call__(self, batch):
        self.calls += 1
        if self.failing or self.calls in self.fail_calls:
            raise SinkUnavailable("down")
        self.stored.extend(batch)


class FsyncLog:
    """run_blocking that records every fsync: (inode, file size at that moment)."""

    def __init__(self, before=None):
        self.calls = []
        self.before = before

    def __call__(self, func, fd):
        if self.before is not None:
            hook, self.before = self.before, None
            hook()
        st = os.fstat(fd)
        self.calls.append((st.st_ino, st.st_size))
        return func(fd)


@pytest.fixture
def spool_dir(tmp_path):
    return str(tmp_path / "spool")


# -- writing, rotation, reopening --

def test_append_writes_frames_to_a_segment_readable_after_a_crash(spool_dir):
    spool = Spool(spool_dir)
    spool.append(pairs(3))
    spool.append(pairs(2, start=3, queue="people"))
    # No close(): a crash.  What os.write put in the file is all there.
    (name,) = seg_files(spool_dir)
    with open(os.path.join(spool_dir, name), "rb") as fh:
        found = read_frames(fh.read())
    assert [(q, p) for _, q, p in found] == pairs(3) + pairs(2, start=3, queue="people")
    assert spool.appended_records == 5


def test_segments_rotate_at_the_size_and_keep_order(spool_dir):
    spool = Spool(spool_dir, segment_bytes=200)
    for i in range(20):
        spool.append(pairs(1, start=i, size=40))
    spool.close()
    files = seg_files(spool_dir)
    assert len(files) >= 5
    assert files == ["spool-%016d.seg" % s for s in range(1, len(files) + 1)]
    for seq, name in enumerate(files, 1):
        with open(os.path.join(spool_dir, name), "rb") as fh:
            assert frames.open_segment(fh.read()).seq == seq
    records = []
    for name in files:
        with open(os.path.join(spool_dir, name), "rb") as fh:
            records += [p for _, _, p in read_frames(fh.read())]
    assert records == [p for _, p in pairs(20, size=40)]


def test_reopening_continues_numbering_and_counts_old_bytes(spool_dir):
    first = Spool(spool_dir)
    first.append(pairs(4))
    first.close()
    size = os.path.getsize(os.path.join(spool_dir, "spool-%016d.seg" % 1))
    second = Spool(spool_dir)
    assert second.has_data.is_set()
    assert second.size_bytes() == size
    second.append(pairs(1, start=4))
    assert seg_files(spool_dir) == ["spool-%016d.seg" % 1, "spool-%016d.seg" % 2]
    second.close()


def test_one_process_owns_a_spool_directory(spool_dir):
    spool = Spool(spool_dir)
    with pytest.raises(SystemExit):
        Spool(spool_dir)
    spool.close()
    Spool(spool_dir).close()                 # released on close


def test_append_after_close_is_refused(spool_dir):
    spool = Spool(spool_dir)
    spool.close()
    with pytest.raises(SinkUnavailable):
        spool.append(pairs(1))


# -- size cap --

def test_size_cap_raises_spool_full_and_writes_nothing(spool_dir):
    full = framed(pairs(10))
    spool = Spool(spool_dir, max_bytes=full)
    spool.append(pairs(10))
    before = spool.size_bytes()
    with pytest.raises(SpoolFull) as info:
        spool.append(pairs(1, start=10))
    assert isinstance(info.value, SinkUnavailable) and info.value.retry_after_s >= 1
    assert spool.size_bytes() == before == full
    (name,) = seg_files(spool_dir)
    assert os.path.getsize(os.path.join(spool_dir, name)) == full
    spool.close()


def test_a_batch_that_would_cross_the_cap_is_refused_whole(spool_dir):
    full = framed(pairs(10))
    spool = Spool(spool_dir, max_bytes=full)
    spool.append(pairs(8))
    with pytest.raises(SpoolFull):
        spool.append(pairs(3, start=8))
    spool.append(pairs(2, start=8))          # what fits still goes in
    assert spool.size_bytes() == full
    spool.close()


def test_forwarding_frees_room_under_the_cap(spool_dir):
    full = framed(pairs(5))
    spool = Spool(spool_dir, max_bytes=full)
    spool.append(pairs(5))
    with pytest.raises(SpoolFull):
        spool.append(pairs(1, start=5))
    put = FlakyPut()
    assert Forwarder(spool, put).forward_once()
    spool.append(pairs(5, start=5))
    assert spool.size_bytes() == framed(pairs(5, start=5))
    spool.close()


# -- fsync policy --

def test_sync_0_fsyncs_before_append_returns(spool_dir):
    log = FsyncLog()
    spool = Spool(spool_dir, sync_ms=0, run_blocking=log)
    for i in range(3):
        spool.append(pairs(1, start=i))
        path = os.path.join(spool_dir, seg_files(spool_dir)[0])
        ino, size = os.stat(path).st_ino, os.path.getsize(path)
        assert (ino, size) in log.calls, "append %d returned before an fsync of its bytes" % i
    spool.close()


def test_group_commit_shares_one_fsync_among_concurrent_appenders(spool_dir):
    gate = threading.Event()
    entered = threading.Event()
    calls = []

    def slow_fsync(func, fd):
        calls.append(os.fstat(fd).st_size)
        entered.set()
        gate.wait(5)                     # the first fsync is slow; others pile up behind it
        return func(fd)

    spool = Spool(spool_dir, sync_ms=0, run_blocking=slow_fsync)
    first = threading.Thread(target=spool.append, args=(pairs(1),))
    first.start()
    assert entered.wait(5)
    others = [threading.Thread(target=spool.append, args=(pairs(1, start=i),)) for i in range(1, 9)]
    for t in others:
        t.start()
    # Each of the 8 has written its frame (under the write lock) before waiting for the sync
    # lock; wait until all 9 frames are in the file, then let the first fsync finish.
    frame = len(encode_frame("events", pairs(1)[0][1]))
    path = os.path.join(spool_dir, seg_files(spool_dir)[0])
    deadline = time.monotonic() + 5
    while os.path.getsize(path) < SEGMENT_HEADER_BYTES + 9 * frame and \
            time.monotonic() < deadline:
        time.sleep(0.001)
    gate.set()
    for t in [first] + others:
        t.join(5)
    assert not any(t.is_alive() for t in [first] + others)
    # One fsync for the first frame, then one more that covers all eight that waited.
    assert calls == [SEGMENT_HEADER_BYTES + frame, SEGMENT_HEADER_BYTES + 9 * frame]
    spool.close()


def test_sync_ms_positive_defers_fsync_to_sync_if_due(spool_dir):
    now = [100.0]
    log = FsyncLog()
    spool = Spool(spool_dir, sync_ms=200, run_blocking=log, clock=lambda: now[0])
    spool.append(pairs(2))
    assert log.calls == []
    now[0] += 0.1
    spool.sync_if_due()
    assert log.calls == []
    now[0] += 0.11
    spool.sync_if_due()
    assert len(log.calls) == 1
    spool.sync_if_due()
    assert len(log.calls) == 1               # nothing new written: no fsync
    spool.close()


def test_group_commit_survives_a_rotation_during_an_fsync(spool_dir):
    """The forwarder's seal_active() can run while a request's fsync is in tpool."""
    log = FsyncLog()
    spool = Spool(spool_dir, sync_ms=0, run_blocking=log)
    log.before = spool.seal_active           # rotation lands in the middle of this sync
    spool.append(pairs(1, size=2000))
    calls = len(log.calls)
    spool.append(pairs(1, start=1))          # first small record in the new segment
    assert len(log.calls) == calls + 1, "append returned without fsyncing its segment"
    spool.close()


def test_an_fsync_of_a_segment_closed_meanwhile_is_not_an_error(spool_dir):
    """In the server the fsync runs in a native thread: the rotation can close the fd
    first (EBADF).  The rotation fsynced that segment, so the append succeeded."""
    spool = Spool(spool_dir, sync_ms=0)

    def rotated_then_ebadf(func, fd):
        spool.seal_active()
        raise OSError(errno.EBADF, "Bad file descriptor")

    spool.run_blocking = rotated_then_ebadf
    spool.append(pairs(1))                   # no exception: the record is durable
    spool.run_blocking = lambda f, fd: f(fd)
    spool.append(pairs(1, start=1))
    put = FlakyPut()
    forwarder = Forwarder(spool, put)
    while forwarder.pending():
        assert forwarder.forward_once()
    assert put.stored == pairs(2)
    spool.close()


def test_a_failing_fsync_refuses_the_batch(spool_dir):
    def broken(func, fd):
        raise OSError(errno.EIO, "I/O error")

    spool = Spool(spool_dir, sync_ms=0, run_blocking=broken)
    with pytest.raises(SinkUnavailable):
        spool.append(pairs(1))
    spool.close()


# -- forwarder --

def test_forwarder_sends_oldest_first_and_deletes_forwarded_segments(spool_dir):
    spool = Spool(spool_dir, segment_bytes=300)
    for i in range(30):
        spool.append(pairs(1, start=i, size=30))
    put = FlakyPut()
    forwarder = Forwarder(spool, put, batch_records=7)
    assert forwarder.forward_once()
    # The first pass takes the closed segments only (the active one is still being
    # written); the next pass seals the active segment and takes the rest, as run() does.
    assert 0 < len(put.stored) < 30 and put.stored == pairs(len(put.stored), size=30)
    assert forwarder.pending()
    assert forwarder.forward_once()
    assert put.stored == pairs(30, size=30)
    assert forwarder.forwarded == 30
    assert [n for n in os.listdir(spool_dir) if n.endswith(".pos")] == []
    # Only the fresh, empty active segment is left, and the size accounting is back to 0.
    for name in seg_files(spool_dir):
        assert os.path.getsize(os.path.join(spool_dir, name)) == 0
    assert spool.size_bytes() == 0
    assert not forwarder.pending()
    spool.close()


def test_forwarder_keeps_a_segment_until_every_record_is_stored(spool_dir):
    spool = Spool(spool_dir)
    spool.append(pairs(10))
    put = FlakyPut(fail_calls={3})           # batches 1 and 2 stored, batch 3 fails
    forwarder = Forwarder(spool, put, batch_records=3)
    assert not forwarder.forward_once()
    assert put.stored == pairs(6)
    seg = os.path.join(spool_dir, "spool-%016d.seg" % 1)
    assert os.path.exists(seg)
    with open(seg + ".pos") as fh:
        pos = int(fh.read().split()[-2])
    assert pos == framed(pairs(6))
    # Retry resumes after the .pos: no record of the first six is sent again.
    assert forwarder.forward_once()
    assert put.stored == pairs(10)
    assert not os.path.exists(seg) and not os.path.exists(seg + ".pos")
    spool.close()


def test_a_lost_pos_file_means_duplicates_never_loss(spool_dir):
    spool = Spool(spool_dir)
    spool.append(pairs(6))
    put = FlakyPut(fail_calls={2})
    forwarder = Forwarder(spool, put, batch_records=3)
    assert not forwarder.forward_once()
    os.unlink(os.path.join(spool_dir, "spool-%016d.seg.pos" % 1))
    assert Forwarder(spool, put, batch_records=3).forward_once()     # as after a restart
    assert put.stored == pairs(3) + pairs(6)
    spool.close()


def test_forwarder_failure_modes_are_all_retryable(spool_dir):
    spool = Spool(spool_dir)
    spool.append(pairs(2))

    def broken(batch):
        raise RuntimeError("client bug")

    forwarder = Forwarder(spool, broken)
    assert not forwarder.forward_once()       # logged, not raised
    put = FlakyPut()
    forwarder.put_many = put
    assert forwarder.forward_once()
    assert put.stored == pairs(2)
    spool.close()


def test_a_predecessors_segments_with_a_torn_tail_are_forwarded_and_deleted(spool_dir):
    crashed = Spool(spool_dir)
    crashed.append(pairs(5))
    crashed.close()
    seg = os.path.join(spool_dir, "spool-%016d.seg" % 1)
    with open(seg, "ab") as fh:
        fh.write(encode_frame("events", b'{"torn":true}')[:-3])
    assert not [n for n in os.listdir(spool_dir) if n.endswith(".damaged")]
    spool = Spool(spool_dir)
    put = FlakyPut()
    assert Forwarder(spool, put).forward_once()
    assert put.stored == pairs(5)
    assert not os.path.exists(seg)
    spool.close()


def test_forwarder_run_delivers_after_an_outage_in_order_and_stops(spool_dir):
    spool = Spool(spool_dir, segment_bytes=400)
    put = FlakyPut()
    put.failing = True
    forwarder = Forwarder(spool, put, batch_records=5, retry_s=0.02)
    thread = threading.Thread(target=forwarder.run, kwargs={"tick_s": 0.005}, daemon=True)
    thread.start()
    try:
        for i in range(0, 40, 4):
            spool.append(pairs(4, start=i))
        put.failing = False
        deadline = time.monotonic() + 5
        while len(put.stored) < 40 and time.monotonic() < deadline:
            time.sleep(0.005)                # poll interval
        assert put.stored == pairs(40)
        spool.append(pairs(3, start=40))     # the idle forwarder wakes for new data
        deadline = time.monotonic() + 5
        while len(put.stored) < 43 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert put.stored == pairs(43)
    finally:
        forwarder.stopping = True
        thread.join(5)
    assert not thread.is_alive()
    spool.close()


# -- SpoolingSink --

def test_spooling_sink_uses_the_primary_while_it_works(spool_dir):
    primary, spool = MemorySink(), Spool(spool_dir)
    sink = SpoolingSink(primary, spool)
    sink.put(pairs(3))
    assert primary.items == pairs(3) and spool.size_bytes() == 0
    assert sink.ready() == (True, "memory sink")
    spool.close()


def test_spooling_sink_spools_what_the_primary_refuses(spool_dir):
    primary, spool = MemorySink(), Spool(spool_dir)
    primary.failing = True
    sink = SpoolingSink(primary, spool)
    sink.put(pairs(3))
    assert primary.items == []
    ok, why = sink.ready()
    assert ok and why.startswith("spooling")
    put = FlakyPut()
    assert Forwarder(spool, put).forward_once()
    assert put.stored == pairs(3)
    spool.close()


def test_spooling_sink_raises_when_both_refuse(spool_dir):
    primary = MemorySink()
    primary.failing = True
    spool = Spool(spool_dir, max_bytes=10)
    with pytest.raises(SinkUnavailable) as info:
        SpoolingSink(primary, spool).put(pairs(1))
    assert isinstance(info.value, SpoolFull)
    spool.close()


def test_spooling_sink_is_not_ready_once_the_spool_refuses(spool_dir):
    primary = MemorySink()
    primary.failing = True
    frame = len(encode_frame("events", pairs(1)[0][1]))
    spool = Spool(spool_dir, max_bytes=framed(pairs(10)) + frame // 2)
    sink = SpoolingSink(primary, spool)
    sink.put(pairs(10))
    with pytest.raises(SpoolFull):
        sink.put(pairs(1, start=10))
    assert sink.ready() == (False, "spool full and memory sink")
    # Forwarding frees the room: ready again (spooling), and appends are taken again.
    assert Forwarder(spool, FlakyPut()).forward_once()
    assert sink.ready() == (True, "spooling (memory sink)")
    sink.put(pairs(1, start=10))
    spool.close()


# -- BatchingSink --

class SlowSink(MemorySink):
    """Inner sink whose put blocks until released; counts its calls."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self.gate = threading.Event()
        self.entered = threading.Event()

    def put(self, pairs):
        self.calls.append(len(pairs))
        self.entered.set()
        self.gate.wait(5)
        super().put(pairs)


def test_batching_sink_coalesces_concurrent_requests(spool_dir):
    inner = SlowSink()
    sink = BatchingSink(inner, writers=1)
    try:
        first = threading.Thread(target=sink.put, args=(pairs(1),))
        first.start()
        assert inner.entered.wait(5)
        rest = [threading.Thread(target=sink.put, args=(pairs(2, start=10 * i),))
                for i in range(1, 6)]
        for t in rest:
            t.start()
        deadline = time.monotonic() + 5
        while len(sink._queue) < 5 and time.monotonic() < deadline:
            time.sleep(0.001)
        inner.gate.set()
        for t in [first] + rest:
            t.join(5)
        assert inner.calls == [1, 10]        # one write for the five that queued
        assert sorted(inner.items) == sorted(pairs(1) + sum((pairs(2, start=10 * i)
                                                             for i in range(1, 6)), []))
    finally:
        sink.close()


def test_batching_sink_put_returns_only_after_the_inner_write(spool_dir):
    inner = SlowSink()
    sink = BatchingSink(inner, writers=2)
    done = threading.Event()
    t = threading.Thread(target=lambda: (sink.put(pairs(1)), done.set()))
    t.start()
    try:
        assert inner.entered.wait(5)
        assert not done.wait(0.05)           # still waiting on the inner write
        inner.gate.set()
        assert done.wait(5)
        assert inner.items == pairs(1)
    finally:
        inner.gate.set()
        sink.close()
        t.join(5)


class CountingSink(MemorySink):
    """Inner sink that records which thread wrote and how many writes were in flight at
    most; each put holds until released."""

    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()
        self.in_flight = self.most = 0
        self.threads = []
        self.gate = threading.Event()

    def put(self, pairs):
        with self.lock:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
            self.threads.append(threading.current_thread().name)
        self.gate.wait(5)
        with self.lock:
            self.in_flight -= 1
        super().put(pairs)


def test_a_lone_request_writes_in_its_own_thread(spool_dir):
    inner = CountingSink()
    inner.gate.set()
    sink = BatchingSink(inner, writers=1)
    try:
        sink.put(pairs(3))
        t = threading.Thread(target=sink.put, args=(pairs(2, start=3),), name="request-2")
        t.start()
        t.join(5)
        assert inner.threads == [threading.current_thread().name, "request-2"]
        assert inner.items == pairs(5) and sink.batches == 2 and sink.records == 5
    finally:
        sink.close()


@pytest.mark.parametrize("writers", [1, 2])
def test_direct_writes_count_against_the_writers_in_flight(spool_dir, writers):
    """Requests writing in their own threads and the writer threads together never have
    more than `writers` writes in flight, and every request is stored."""
    inner = CountingSink()
    sink = BatchingSink(inner, writers=writers)
    threads = [threading.Thread(target=sink.put, args=(pairs(2, start=2 * i),),
                                name="request-%d" % i) for i in range(12)]
    try:
        for t in threads:
            t.start()
        wait_until(lambda: len(sink._queue) >= 12 - writers, timeout=5, interval=0.001,
                   message="the requests to queue behind the writes in flight")
        assert len(sink._queue) == 12 - writers and inner.in_flight == writers
        inner.gate.set()
        for t in threads:
            t.join(5)
        assert inner.most == writers
        assert sorted(inner.items) == sorted(pairs(24))
        assert sum(1 for name in inner.threads if name.startswith("request-")) == writers
    finally:
        inner.gate.set()
        sink.close()


def test_a_direct_write_that_raises_anything_else_is_sink_unavailable(spool_dir):
    class Broken:
        def put(self, pairs):
            raise RuntimeError("bug")

    sink = BatchingSink(Broken(), writers=1)
    try:
        with pytest.raises(SinkUnavailable, match="bug"):
            sink.put(pairs(1))
        assert sink._writing == 0
    finally:
        sink.close()


def test_a_put_after_close_is_refused_not_left_waiting(spool_dir):
    inner = CountingSink()
    sink = BatchingSink(inner, writers=1)
    first = threading.Thread(target=sink.put, args=(pairs(1),))
    first.start()
    try:
        wait_until(lambda: inner.in_flight, timeout=5, interval=0.001,
                   message="the first request to hold the only write slot")
        sink.close()
        with pytest.raises(SinkUnavailable):
            sink.put(pairs(1, start=1))    # would queue behind a writer that has ended
    finally:
        inner.gate.set()
        first.join(5)
    assert inner.items == pairs(1)


def test_a_direct_write_that_fails_raises_its_share(spool_dir):
    inner = MemorySink()
    inner.failing = True
    sink = BatchingSink(inner, writers=1)
    try:
        with pytest.raises(SinkUnavailable):
            sink.put(pairs(2))
        assert sink._writing == 0 and inner.items == []
        inner.failing = False
        sink.put(pairs(2))                 # the write slot was given back
        assert inner.items == pairs(2)
    finally:
        sink.close()


def test_batching_sink_fails_every_request_of_a_failed_batch(spool_dir):
    inner = MemorySink()
    inner.failing = True
    sink = BatchingSink(inner, writers=2)
    errors = []

    def put(i):
        try:
            sink.put(pairs(1, start=i))
        except SinkUnavailable as exc:
            errors.append(exc)

    threads = [threading.Thread(target=put, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    sink.close()
    assert len(errors) == 10 and inner.items == []


def test_batching_sink_turns_unexpected_errors_into_sink_unavailable(spool_dir):
    class Broken:
        def put(self, pairs):
            raise ValueError("bug")

    sink = BatchingSink(Broken(), writers=1)
    with pytest.raises(SinkUnavailable):
        sink.put(pairs(1))
    sink.close()


def test_batching_sink_respects_max_batch_records(spool_dir):
    inner = SlowSink()
    sink = BatchingSink(inner, writers=1, max_batch_records=5)
    threads = [threading.Thread(target=sink.put, args=(pairs(1),))]
    threads[0].start()
    assert inner.entered.wait(5)
    threads += [threading.Thread(target=sink.put, args=(pairs(2, start=i),)) for i in range(6)]
    for t in threads[1:]:
        t.start()
    deadline = time.monotonic() + 5
    while len(sink._queue) < 6 and time.monotonic() < deadline:
        time.sleep(0.001)
    inner.gate.set()
    for t in threads:
        t.join(5)
    sink.close()
    assert inner.calls[0] == 1 and sum(inner.calls) == 13
    assert all(n <= 5 for n in inner.calls[1:]) and len(inner.calls) == 4


def test_spooling_over_batching_spools_a_failed_batch_for_every_request(spool_dir):
    inner = MemorySink()
    inner.failing = True
    spool = Spool(spool_dir)
    sink = SpoolingSink(BatchingSink(inner, writers=2), spool)
    threads = [threading.Thread(target=sink.put, args=(pairs(2, start=2 * i),)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    put = FlakyPut()
    assert Forwarder(spool, put).forward_once()
    assert sorted(put.stored) == sorted(pairs(16))
    sink.primary.close()
    spool.close()


# -- disk and descriptor failures (no acknowledged record may be lost) --

def test_a_failed_write_is_not_acknowledged_and_later_records_stay_readable(spool_dir, monkeypatch):
    from ingest.sinks import spool as spool_module
    spool = Spool(spool_dir)
    spool.append(pairs(1, start=0))
    real_write = os.write
    calls = {"n": 0}

    def short_then_full(fd, buf):
        calls["n"] += 1
        if calls["n"] == 1:
            real_write(fd, bytes(buf[:10]))      # part of a frame reaches the disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, buf)

    monkeypatch.setattr(spool_module.os, "write", short_then_full)
    with pytest.raises(SinkUnavailable):
        spool.append(pairs(1, start=1))
    monkeypatch.setattr(spool_module.os, "write", real_write)
    spool.append(pairs(1, start=2))
    spool.append(pairs(1, start=3))
    put = FlakyPut()
    forwarder = Forwarder(spool, put)
    assert forwarder.forward_once()
    expected = pairs(1, start=0) + pairs(1, start=2) + pairs(1, start=3)
    assert put.stored == expected
    spool.close()


def test_a_failed_rotation_leaves_the_spool_as_it_was(spool_dir, monkeypatch):
    from ingest.sinks import spool as spool_module
    spool = Spool(spool_dir)
    spool.append(pairs(1, start=0))
    real = spool_module._fsync_dir

    def once(path):
        monkeypatch.setattr(spool_module, "_fsync_dir", real)
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(spool_module, "_fsync_dir", once)
    with pytest.raises(OSError):
        spool.seal_active()
    spool.append(pairs(1, start=1))
    put = FlakyPut()
    forwarder = Forwarder(spool, put)
    assert forwarder.forward_once()
    spool.append(pairs(1, start=2))
    assert forwarder.forward_once()
    assert put.stored == pairs(3)
    spool.close()
    again = Spool(spool_dir)
    assert Forwarder(again, put).forward_once()
    assert put.stored == pairs(3)                # nothing left behind, nothing lost
    again.close()


def test_the_forwarder_survives_errors_and_keeps_forwarding(spool_dir, monkeypatch):
    from ingest.sinks import forwarder as forwarder_module
    spool = Spool(spool_dir)
    spool.append(pairs(5))
    real = forwarder_module.Progress.save
    failures = {"n": 0}

    def full_disk(progress, offset):
        failures["n"] += 1
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(forwarder_module.Progress, "save", full_disk)
    put = FlakyPut()
    forwarder = Forwarder(spool, put, batch_records=2, retry_s=0.01)
    thread = threading.Thread(target=forwarder.run, kwargs={"tick_s": 0.005}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while failures["n"] < 2 and time.monotonic() < deadline:
        time.sleep(0.005)                        # poll interval
    assert failures["n"] >= 2 and thread.is_alive()
    monkeypatch.setattr(forwarder_module.Progress, "save", real)
    while not (set(put.stored) >= set(pairs(5)) and not forwarder.pending()) \
            and time.monotonic() < deadline:
        time.sleep(0.005)                        # poll interval
    forwarder.stopping = True
    thread.join(5)
    assert not thread.is_alive()
    assert set(put.stored) == set(pairs(5))      # duplicates allowed, losses not
    spool.close()


def test_damage_in_the_first_frame_keeps_its_bytes_and_delivers_the_rest(spool_dir):
    spool = Spool(spool_dir)
    spool.append(pairs(3))
    spool.seal_active()
    seq = spool.closed_segments()[0]
    path = spool.path(seq)
    with open(path, "r+b") as fh:
        fh.seek(SEGMENT_HEADER_BYTES + frames.FRAME_HEADER_BYTES + 2)   # the queue name
        fh.write(b"\xff")
    put = FlakyPut()
    assert Forwarder(spool, put).forward_once()
    assert put.stored == pairs(3)[1:]
    kept = path + "@%d.damaged" % SEGMENT_HEADER_BYTES
    assert os.path.getsize(kept) == len(encode_frame(*pairs(1)[0]))
    assert not os.path.exists(path)
    assert (spool.damaged_records, spool.damaged_bytes) == (1, os.path.getsize(kept))
    spool.close()


# -- partial failures: what Kestrel stored is not sent again --

class PartialPut:
    """Stores the first `k` pairs of the first call, then refuses the rest, reporting
    them as `remaining` (as KestrelSink does with the client's KestrelUnavailable)."""

    def __init__(self, k):
        self.k = k
        self.stored = []
        self.calls = 0

    def __call__(self, batch):
        self.calls += 1
        if self.calls == 1:
            self.stored.extend(batch[:self.k])
            raise SinkUnavailable("partly refused", remaining=list(batch[self.k:]))
        self.stored.extend(batch)

    put = __call__


def test_forwarder_resends_only_what_was_not_stored(spool_dir):
    spool = Spool(spool_dir)
    spool.append(pairs(10))
    put = PartialPut(4)
    forwarder = Forwarder(spool, put)
    assert not forwarder.forward_once()
    assert forwarder.forward_once()
    assert put.stored == pairs(10)               # each exactly once, in order
    spool.close()


def test_spooling_sink_spools_only_what_kestrel_did_not_store(spool_dir):
    spool = Spool(spool_dir)
    primary = PartialPut(3)
    sink = SpoolingSink(primary, spool)
    sink.put(pairs(5))
    out = FlakyPut()
    assert Forwarder(spool, out).forward_once()
    assert primary.stored == pairs(3) and out.stored == pairs(5)[3:]
    spool.close()


def test_batching_sink_tells_each_request_its_own_unstored_part():
    release = threading.Event()

    class Inner:
        def put(self, batch):
            release.wait(5)
            # the first request's pairs were stored, the second's were not
            raise SinkUnavailable("partly", remaining=[p for p in batch if p[0] == "b"])

    sink = BatchingSink(Inner())
    results = {}

    def send(name):
        try:
            sink.put([(name, b"x"), (name, b"y")])
            results[name] = "stored"
        except SinkUnavailable as exc:
            results[name] = [q for q, _ in exc.remaining]

    threads = [threading.Thread(target=send, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    release.set()
    for t in threads:
        t.join(5)
    sink.close()
    # Whether the two were coalesced into one batch or not, each learns its own share.
    assert results == {"a": "stored", "b": ["b", "b"]}


def test_periodic_fsync_runs_on_its_own_timer(spool_dir):
    """With sync_ms > 0 an append returns before any fsync, and the syncer makes it
    durable within about sync_ms even though no forwarder pass runs."""
    log = FsyncLog()
    spool = Spool(spool_dir, sync_ms=30, run_blocking=log)
    forwarder = Forwarder(spool, FlakyPut())
    spool.append(pairs(1))
    assert log.calls == []
    thread = threading.Thread(target=forwarder.run_syncer, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while not log.calls and time.monotonic() < deadline:
        time.sleep(0.005)                        # poll interval
    forwarder.stopping = True
    thread.join(5)
    assert log.calls, "no fsync within 5 s"
    spool.close()
