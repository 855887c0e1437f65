"""Journal record encoding, replay and torn-tail detection (ingest/queue/journal.py).

No sockets; the Journal/load tests use a temporary directory.
"""
import logging
import os
import zlib

import pytest

from ingest.queue import journal as jr


def add(data, add_ms=1000, expiry_ms=0):
    return jr.encode_add(data, add_ms, expiry_ms)


def ops(*records):
    return b"".join(records)


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


def test_empty_and_binary_items_survive_replay():
    items = [b"", b"\r\n\x00\xff" * 10, bytes(range(256))]
    state = jr.replay_bytes(ops(*[add(x) for x in items]))
    assert [jr.item_data(r) for r in state.items] == items
    assert not state.torn


def test_remove_open_confirm_unremove_flush():
    buf = ops(add(b"a"), add(b"b"), add(b"c"), add(b"d"),
              jr.REMOVE_RECORD,                          # a gone
              jr.encode_xid(jr.OP_OPEN, 7),              # b open as 7
              jr.encode_xid(jr.OP_OPEN, 8),              # c open as 8
              jr.encode_xid(jr.OP_CONFIRM, 7),           # b done
              jr.encode_xid(jr.OP_UNREMOVE, 8))          # c back at head
    state = jr.replay_bytes(buf)
    assert [jr.item_data(r) for r in state.items] == [b"c", b"d"]
    assert state.open == {}
    assert state.max_xid == 8
    assert state.good_bytes == len(buf) and not state.torn
    flushed = jr.replay_bytes(buf + jr.FLUSH_RECORD + add(b"e"))
    assert [jr.item_data(r) for r in flushed.items] == [b"e"]


def test_reads_open_at_end_are_reported():
    state = jr.replay_bytes(ops(add(b"a"), add(b"b"), jr.encode_xid(jr.OP_OPEN, 3)))
    assert [jr.item_data(r) for r in state.items] == [b"b"]
    assert {x: jr.item_data(r) for x, r in state.open.items()} == {3: b"a"}


def test_every_cut_point_yields_the_valid_prefix():
    records = [add(b"first"), add(b"x" * 40), jr.encode_xid(jr.OP_OPEN, 1), add(b"")]
    buf = ops(*records)
    boundaries = [0]
    for r in records:
        boundaries.append(boundaries[-1] + len(r))
    for cut in range(len(buf) + 1):
        state = jr.replay_bytes(buf[:cut])
        expected = max(b for b in boundaries if b <= cut)
        assert state.good_bytes == expected, cut
        assert state.torn == (cut != expected), cut


def test_flipped_bit_is_checksum_mismatch():
    buf = bytearray(ops(add(b"good"), add(b"damaged")))
    buf[-2] ^= 0x01
    state = jr.replay_bytes(bytes(buf))
    assert state.torn and state.reason == "checksum mismatch"
    assert [jr.item_data(r) for r in state.items] == [b"good"]
    assert state.good_bytes == len(add(b"good"))


@pytest.mark.parametrize("bad", [
    jr._simple(bytes((99,))),                           # unknown opcode
    jr.REMOVE_RECORD + jr.REMOVE_RECORD,                # remove from an empty queue
    jr.encode_xid(jr.OP_CONFIRM, 42),                   # confirm of a read never opened
    jr.encode_xid(jr.OP_UNREMOVE, 42),
    b"\xff\xff\xff\xff\x00\x00\x00\x00",                # absurd length
])
def test_inconsistent_or_garbage_records_stop_replay(bad):
    good = ops(add(b"a"), jr.REMOVE_RECORD)
    state = jr.replay_bytes(good + bad)
    assert state.torn
    assert state.good_bytes == len(good)
    assert list(state.items) == []


def test_journal_writes_batch_with_one_call_and_tracks_size(tmp_path):
    path = str(tmp_path / "q")
    j = jr.Journal(path)
    j.append(add(b"a"))
    j.append(add(b"b"))
    assert os.path.getsize(path) == 0            # buffered until write()
    j.write()
    assert j.size == os.path.getsize(path) == 2 * len(add(b"a"))
    assert j.dirty
    j.truncate()
    assert j.size == os.path.getsize(path) == 0
    j.append(add(b"c"))
    j.close()
    assert [jr.item_data(r) for r in jr.load(path).items] == [b"c"]


def test_rewrite_replaces_file_and_hands_old_fd_over(tmp_path):
    path = str(tmp_path / "q")
    j = jr.Journal(path)
    for x in (b"a", b"b", b"c"):
        j.append(add(x))
    j.append(jr.REMOVE_RECORD)
    j.write()
    closed = []
    j.rewrite([add(b"b"), add(b"c")], closed.append)
    assert len(closed) == 1
    os.close(closed[0])
    j.append(add(b"d"))
    j.write()
    assert [jr.item_data(r) for r in jr.load(path).items] == [b"b", b"c", b"d"]
    assert not [n for n in os.listdir(str(tmp_path)) if "~~" in n]
    j.close()


def test_load_truncates_torn_tail_with_log_line(tmp_path, caplog):
    path = str(tmp_path / "q")
    good = ops(add(b"one"), add(b"two"))
    with open(path, "wb") as fh:
        fh.write(good + add(b"three")[:-2])
    with caplog.at_level(logging.WARNING, logger="ingest.queue.journal"):
        state = jr.load(path)
    assert [jr.item_data(r) for r in state.items] == [b"one", b"two"]
    assert os.path.getsize(path) == len(good)
    assert "truncated" in caplog.text


def test_rewrite_of_many_records_is_written_in_chunks(tmp_path):
    path = str(tmp_path / "q")
    j = jr.Journal(path)
    records = [add(b"%06d" % i + b"r" * 1000) for i in range(6000)]   # ~6 MB, > one chunk
    closed = []
    j.rewrite(records, closed.append)
    os.close(closed[0])
    assert j.size == os.path.getsize(path) == sum(len(r) for r in records)
    assert list(jr.load(path).items) == records
    j.close()


def test_a_failed_journal_write_stops_the_server(tmp_path, monkeypatch):
    """Nothing after a failed write may be acknowledged: the server exits (EX_TEMPFAIL)
    and its restart replays the journal as it is on disk."""
    import errno
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
