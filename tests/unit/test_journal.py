"""Journal records, replay at start (read-behind, torn tails, damage) and reading back.

ingest/queue/journal.py, replay.py and backlog.py; no sockets, files in a temporary
directory.
"""
import errno
import logging
import os
import zlib

import pytest

from ingest.queue import journal as jr
from ingest.queue import replay
from ingest.queue.backlog import ITEM_OVERHEAD, Backlog, Damaged
from testkit.damage import flip_byte


def add(data, add_ms=1000, expiry_ms=0):
    return jr.encode_add(data, add_ms, expiry_ms)


def write(tmp_path, *records, name="q"):
    path = str(tmp_path / name)
    with open(path, "wb") as fh:
        fh.write(b"".join(records))
    return path


def data(records):
    return [jr.item_data(r) if r is not None else None for r in records]


def load(path, memory=1 << 30):
    return replay.load(path, memory)


def test_add_record_layout_and_accessors():
    rec = add(b"hello", add_ms=123456789, expiry_ms=987654321)
    length, crc = jr.HEADER.unpack_from(rec)
    assert length == len(rec) - 8 == 17 + 5
    assert crc == zlib.crc32(rec[8:])
    assert rec[8] == jr.OP_ADD
    assert jr.item_data(rec) == b"hello"
    assert jr.item_size(rec) == 5
    assert jr.item_add_ms(rec) == 123456789
    assert jr.item_expiry_ms(rec) == 987654321


def test_empty_and_binary_items_survive_replay(tmp_path):
    items = [b"", b"\r\n\x00\xff" * 10, bytes(range(256))]
    loaded = load(write(tmp_path, *[add(x) for x in items]))
    assert data(loaded.head) == items and loaded.backlog is None and loaded.lost == 0


def test_remove_open_confirm_unremove_flush(tmp_path):
    records = [add(b"a"), add(b"b"), add(b"c"), add(b"d"),
               jr.REMOVE_RECORD,                          # a gone
               jr.encode_xid(jr.OP_OPEN, 7),              # b open as 7
               jr.encode_xid(jr.OP_OPEN, 8),              # c open as 8
               jr.encode_xid(jr.OP_CONFIRM, 7),           # b done
               jr.encode_xid(jr.OP_UNREMOVE, 8)]          # c back at head
    loaded = load(write(tmp_path, *records))
    assert data(loaded.head) == [b"c", b"d"]
    assert loaded.open == {} and loaded.max_xid == 8
    flushed = load(write(tmp_path, *records, jr.FLUSH_RECORD, add(b"e"), name="f"))
    assert data(flushed.head) == [b"e"]


def test_reads_open_at_end_are_reported(tmp_path):
    loaded = load(write(tmp_path, add(b"a"), add(b"b"), jr.encode_xid(jr.OP_OPEN, 3)))
    assert data(loaded.head) == [b"b"]
    assert {x: jr.item_data(r) for x, r in loaded.open.items()} == {3: b"a"}


def test_every_cut_point_is_a_torn_tail_truncated_to_the_valid_prefix(tmp_path):
    records = [add(b"first"), add(b"x" * 40), jr.encode_xid(jr.OP_OPEN, 1), add(b"")]
    buf = b"".join(records)
    boundaries = [0]
    for r in records:
        boundaries.append(boundaries[-1] + len(r))
    for cut in range(len(buf) + 1):
        path = write(tmp_path, buf[:cut], name="cut%d" % cut)
        loaded = load(path)
        expected = max(b for b in boundaries if b <= cut)
        assert loaded.size == os.path.getsize(path) == expected, cut
        assert not [n for n in os.listdir(str(tmp_path)) if "damaged" in n], cut


def test_torn_tail_is_truncated_with_a_log_line(tmp_path, caplog):
    good = add(b"one") + add(b"two")
    path = write(tmp_path, good, add(b"three")[:-2])
    with caplog.at_level(logging.WARNING, logger="ingest.queue.journal"):
        loaded = load(path)
    assert data(loaded.head) == [b"one", b"two"]
    assert os.path.getsize(path) == len(good)
    assert "truncated" in caplog.text


def _damaged_copies(tmp_path):
    return [n for n in os.listdir(str(tmp_path)) if ".damaged-" in n]


def test_flipped_byte_mid_journal_loses_only_that_item(tmp_path, caplog):
    items = [add(b"item-%02d" % i * 10) for i in range(10)]
    path = write(tmp_path, *items)
    original = open(path, "rb").read()
    flip_byte(path, sum(len(r) for r in items[:5]) + 40)     # inside item 5's data
    damaged = open(path, "rb").read()
    with caplog.at_level(logging.ERROR, logger="ingest.queue.journal"):
        loaded = load(path)
    assert data(loaded.head) == data(items[:5] + items[6:])
    assert loaded.lost == 1
    assert "1 items lost" in caplog.text
    [copy] = _damaged_copies(tmp_path)
    assert open(str(tmp_path / copy), "rb").read() == damaged != original
    assert load(path).lost == 0            # the journal was rewritten clean
    assert not _damaged_copies(tmp_path)[1:]


def test_flipped_length_field_is_repaired(tmp_path, caplog):
    items = [add(b"%03d" % i * 30) for i in range(40)]
    path = write(tmp_path, *items)
    flip_byte(path, sum(len(r) for r in items[:20]) + 1)      # item 20's length field
    with caplog.at_level(logging.ERROR, logger="ingest.queue.journal"):
        loaded = load(path)
    assert data(loaded.head) == data(items) and loaded.lost == 0
    assert "1 records repaired" in caplog.text


def test_a_run_of_unreadable_bytes_costs_at_most_its_size_in_items(tmp_path):
    items = [add(b"%03d" % i * 30) for i in range(40)]
    path = write(tmp_path, *items)
    at = sum(len(r) for r in items[:20]) + 20
    with open(path, "r+b") as fh:                         # zeros across items 20 and 21
        fh.seek(at)
        fh.write(b"\0" * 100)
    loaded = load(path)
    assert data(loaded.head) == data(items[:20] + items[22:])
    assert 2 <= loaded.lost <= (len(items[20]) * 2) // 25      # an upper bound


def test_removals_after_a_gap_never_drop_a_later_item(tmp_path):
    """[a][b damaged][c] REMOVE REMOVE: the removals took a and b, so c stays and b,
    already delivered, is not lost; with one REMOVE b is what was lost."""
    a, b, c = add(b"a" * 30), add(b"b" * 30), add(b"c" * 30)
    for removes, lost in ((2, 0), (1, 1)):
        path = write(tmp_path, a, b, c, jr.REMOVE_RECORD * removes, name="g%d" % removes)
        flip_byte(path, len(a) + 30)
        loaded = load(path)
        assert (data(loaded.head), loaded.lost) == ([b"c" * 30], lost)


def test_head_operations_that_refer_to_nothing_are_skipped(tmp_path, caplog):
    path = write(tmp_path, add(b"a"), jr.REMOVE_RECORD, jr.REMOVE_RECORD,
                 jr.encode_xid(jr.OP_CONFIRM, 42), add(b"b"), jr._simple(bytes((99,))),
                 add(b"c"))
    with caplog.at_level(logging.ERROR, logger="ingest.queue.journal"):
        loaded = load(path)
    assert data(loaded.head) == [b"b", b"c"] and loaded.lost == 0
    assert "2 head operations skipped" in caplog.text
    assert len(_damaged_copies(tmp_path)) == 1


def test_replay_keeps_only_the_memory_bound_and_a_backlog(tmp_path):
    items = [add(b"%04d" % i + b"r" * 96) for i in range(100)]     # 125-byte records
    ops = []
    for i, r in enumerate(items):
        ops.append(r)
        if i % 3 == 0:
            ops.append(jr.REMOVE_RECORD)
    path = write(tmp_path, *ops)
    bound = 10 * (125 + ITEM_OVERHEAD)
    loaded = load(path, bound)
    live = items[34:]                          # 34 removes took the first 34 items
    assert data(loaded.head) == data(live[:10])
    pos, count, nbytes = loaded.backlog
    assert (count, nbytes) == (len(live) - 10, 100 * (len(live) - 10))
    backlog = Backlog(pos, count, nbytes, chunk=64)
    got = []
    fd = os.open(path, os.O_RDONLY)
    try:
        while backlog.items:
            want = backlog.want(os.path.getsize(path))
            if want is not None:
                backlog.feed(want[0], os.pread(fd, want[1], want[0]))
            got += backlog.take(300)[0]
    finally:
        os.close(fd)
    assert got == live[10:] and backlog.bytes == 0


def test_backlog_take_stops_at_the_budget_and_flags_a_damaged_item():
    records = [add(b"x" * 100) for _ in range(3)]
    buf = bytearray(b"".join([jr.REMOVE_RECORD] + records))
    backlog = Backlog(0, 3, 300)
    backlog.feed(0, bytes(buf))
    first, spent = backlog.take(1)
    assert first == records[:1] and spent == len(records[0]) + ITEM_OVERHEAD
    buf[len(jr.REMOVE_RECORD) + 2 * len(records[0]) + 50] ^= 1      # the third item
    backlog = Backlog(0, 3, 300)
    backlog.feed(0, bytes(buf))
    assert backlog.take(1 << 20)[0] == records[:2]        # the sound ones first
    with pytest.raises(Damaged) as hit:
        backlog.take(1 << 20)
    assert hit.value.item and hit.value.end == len(buf)
    backlog.skip(hit.value)
    assert (backlog.items, backlog.pos) == (0, len(buf))


def test_frame_checks():
    recs = [add(b"a" * 20), jr.REMOVE_RECORD, add(b"b")]
    buf = bytearray(b"".join(recs))
    assert jr.frame_end(buf, 0, len(buf)) == len(recs[0])
    assert jr.frame_end(buf, 0, len(recs[0]) - 1) is None          # incomplete
    assert jr.frame_end(jr._simple(bytes((jr.OP_REMOVE, 0))), 0, 10) is None   # body size
    buf[12] ^= 1
    assert jr.frame_end(buf, 0, len(buf)) is None


def test_journal_writes_batch_with_one_call_and_tracks_size(tmp_path):
    path = str(tmp_path / "q")
    j = jr.Journal(path)
    j.append(add(b"a"))
    j.append(add(b"b"))
    assert os.path.getsize(path) == 0            # buffered until write()
    assert j.end == 2 * len(add(b"a"))
    j.write()
    assert j.size == os.path.getsize(path) == 2 * len(add(b"a")) == j.end
    assert j.dirty
    assert j.read(0, 5) == add(b"a")[:5]
    closed = []
    j.truncate(closed.append)
    assert j.size == os.path.getsize(path) == 0 and j.generation == 1
    for fd in closed:
        os.close(fd)
    j.append(add(b"c"))
    j.close()
    assert data(load(path).head) == [b"c"]


def test_a_failed_journal_write_stops_the_server(tmp_path, monkeypatch):
    """Nothing after a failed write may be acknowledged: the server exits (EX_TEMPFAIL)
    and its restart replays the journal as it is on disk."""
    calls = []

    def fatal(what, exc):
        calls.append((what, exc.errno))
        raise SystemExit(jr.EXIT_IO_ERROR)

    def full_disk(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    j = jr.Journal(str(tmp_path / "events"))
    j.append(add(b"x"))
    monkeypatch.setattr(jr, "fatal_io_error", fatal)
    monkeypatch.setattr(jr, "_raw_write", full_disk)
    with pytest.raises(SystemExit) as stop:
        j.write()
    assert stop.value.code == jr.EXIT_IO_ERROR
    assert calls and calls[0][1] == errno.ENOSPC and "events" in calls[0][0]
