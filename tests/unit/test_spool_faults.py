"""Dirty faults of the spool, in-process: flipped bytes anywhere in a segment, torn
tails, old-format segments, stale or foreign progress files, segment numbers across
restarts, records every Kestrel server refuses (dead letters), and a disk that fails
(what /ready says).  Real files in tmp_path; an in-memory put; no sockets.
"""
import errno
import os

import pytest

from ingest.sinks import SinkUnavailable, frames
from ingest.sinks.fallback import SpoolingSink
from ingest.sinks.forwarder import Forwarder
from ingest.sinks.frames import DAMAGED, FRAME, SEGMENT_HEADER_BYTES, TORN, encode_frame
from ingest.sinks.memory import MemorySink
from ingest.sinks.spool import Spool
from testkit.spoolfiles import flip, frame_offsets, legacy_frame, legacy_segment, length_byte


def pairs(n, start=0, queue="events"):
    return [(queue, b'{"n":%d,"pad":"abcdefghijklmnop"}' % i) for i in range(start, start + n)]


def kinds(data, start=0, version=frames.VERSION):
    out = []
    for event in frames.scan(data, start, version):
        out.append(event[0] if event[0] is not FRAME else event[3])
    return out


class Put:
    """An in-memory Kestrel cluster: `limit` refuses bigger items (NOT_STORED from every
    server, as KestrelSink reports it); `down` fails like an outage."""

    def __init__(self, limit=None):
        self.stored = []
        self.limit = limit
        self.down = False

    def __call__(self, batch):
        if self.down:
            raise SinkUnavailable("down", remaining=list(batch))
        refused = [p for p in batch if self.limit is not None and len(p[1]) > self.limit]
        self.stored.extend(p for p in batch if p not in refused)
        if refused:
            raise SinkUnavailable("NOT_STORED", remaining=refused, refused=True)


def clock_at(now):
    """A clock for the forwarder and the spool: `clock.now` is what it says."""
    def clock():
        return clock.now
    clock.now = now
    return clock


@pytest.fixture
def spool_dir(tmp_path):
    return str(tmp_path / "spool")


def sealed(spool_dir, records):
    """A spool holding `records` in one closed segment; (spool, its path)."""
    spool = Spool(spool_dir)
    spool.append(records)
    spool.seal_active()
    return spool, spool.path(spool.closed_segments()[0])


# ---- the frame format ----------------------------------------------------------------

def test_every_single_byte_flip_loses_at_most_its_own_frame():
    good = [encode_frame("events", b'{"n":%d}' % i) for i in range(3)]
    data = frames.segment_header(1, b"\x01" * 16) + b"".join(good)
    middle = SEGMENT_HEADER_BYTES + len(good[0])
    for offset in range(middle, len(data)):
        damaged = bytearray(data)
        damaged[offset] ^= 0x80
        found = kinds(bytes(damaged), SEGMENT_HEADER_BYTES)
        if offset < middle + len(good[1]):
            assert found == [b'{"n":0}', DAMAGED, b'{"n":2}'], offset
        else:                                 # the last frame: damage, never a torn tail
            assert found == [b'{"n":0}', b'{"n":1}', DAMAGED], offset


def test_a_flipped_length_byte_is_damage_and_the_frames_after_it_are_read():
    frames_ = [encode_frame("events", b'{"n":%d}' % i) for i in range(300)]
    data = bytearray(b"".join(frames_))
    at = sum(len(f) for f in frames_[:100])
    data[at + len(frames.SYNC) + 3] ^= 0x80           # the length's high byte
    events = list(frames.scan(bytes(data), 0))
    assert [e[0] for e in events].count(FRAME) == 299
    (damage,) = [e for e in events if e[0] is DAMAGED]
    assert damage[1:] == (at, at + len(frames_[100]), 1)


def test_a_torn_tail_is_reported_torn_at_every_cut_point():
    good = encode_frame("events", b'{"n":1}')
    last = encode_frame("events", b'{"n":2,"pad":"abcdefgh"}')
    for cut in range(1, len(last)):
        assert kinds(good + last[:cut]) == [b'{"n":1}', TORN], cut
    assert kinds(good + b"\0" * 300) == [b'{"n":1}', TORN]     # extended, never written


def test_open_segment_tells_the_formats_apart():
    header = frames.segment_header(7, b"\x02" * 16)
    body = encode_frame("q", b"1")
    seg = frames.open_segment(header + body)
    assert (seg.version, seg.seq, seg.body, seg.empty) == (2, 7, SEGMENT_HEADER_BYTES, False)
    assert frames.open_segment(b"").empty and frames.open_segment(header[:10]).empty
    assert frames.open_segment(header).empty
    assert frames.open_segment(legacy_frame("q", b"1")).version == 1
    broken = bytearray(header + body)
    broken[8] ^= 1                                     # the header's sequence number
    seg = frames.open_segment(bytes(broken))
    assert (seg.version, seg.identity, seg.body) == (2, None, SEGMENT_HEADER_BYTES)


def test_old_format_damage_is_kept_and_the_frames_after_it_are_read():
    old = [legacy_frame("events", b'{"n":%d}' % i) for i in range(5)]
    data = bytearray(b"".join(old))
    data[len(old[0]) + 3] ^= 0x80                      # frame 1's length
    assert kinds(bytes(data), 0, 1) == [b'{"n":0}', DAMAGED, b'{"n":2}', b'{"n":3}', b'{"n":4}']
    # An old format cannot tell a torn tail from damage: the tail is kept, not dropped.
    assert kinds(b"".join(old[:2]) + old[2][:-3], 0, 1) == [b'{"n":0}', b'{"n":1}', DAMAGED]


# ---- forwarding through damage -----------------------------------------------------------

def test_a_flipped_length_byte_loses_one_record_and_keeps_its_bytes(spool_dir):
    spool, path = sealed(spool_dir, pairs(300))
    starts = frame_offsets(path)
    flip(path, length_byte(starts[100]))
    put = Put()
    assert Forwarder(spool, put, batch_records=50).forward_once()
    assert put.stored == pairs(300)[:100] + pairs(300)[101:]
    kept = path + "@%d.damaged" % starts[100]
    with open(kept, "rb") as fh:
        assert len(fh.read()) == starts[101] - starts[100]
    assert spool.damaged_records == 1 and not os.path.exists(path)
    spool.close()


def test_an_old_format_segment_is_forwarded_after_an_upgrade(spool_dir):
    os.makedirs(spool_dir)
    legacy_segment(os.path.join(spool_dir, "spool-%016d.seg" % 3), pairs(20))
    with open(os.path.join(spool_dir, "spool-%016d.seg.pos" % 3), "w") as fh:
        fh.write(str(sum(len(legacy_frame(q, p)) for q, p in pairs(5))))   # old progress
    spool = Spool(spool_dir)
    put = Put()
    assert Forwarder(spool, put).forward_once()
    assert put.stored == pairs(20)[5:]
    spool.append(pairs(1, start=20))
    assert spool.segments() == [4]                     # numbering goes on above it
    spool.close()


def test_an_old_progress_offset_inside_a_frame_is_ignored(spool_dir):
    os.makedirs(spool_dir)
    legacy_segment(os.path.join(spool_dir, "spool-%016d.seg" % 1), pairs(4))
    with open(os.path.join(spool_dir, "spool-%016d.seg.pos" % 1), "w") as fh:
        fh.write("7")
    spool = Spool(spool_dir)
    put = Put()
    assert Forwarder(spool, put).forward_once()
    assert put.stored == pairs(4)                      # from the start: duplicates, not loss
    spool.close()


# ---- progress files and segment numbers ---------------------------------------------------

def test_progress_of_another_segment_is_never_applied(spool_dir):
    spool = Spool(spool_dir, segment_bytes=1)          # one segment per append
    spool.append(pairs(10))
    spool.append(pairs(10, start=10))
    spool.seal_active()
    first, second = spool.closed_segments()
    put = Put()
    answers = iter([True])

    def once_then_down(batch):
        if not next(answers, False):
            raise SinkUnavailable("down")
        put(batch)

    forwarder = Forwarder(spool, once_then_down, batch_records=4)
    assert not forwarder.forward_once()                # 4 of the first segment, then down
    os.replace(spool.path(first) + ".pos", spool.path(second) + ".pos")
    forwarder = Forwarder(spool, put)                  # as after a restart
    assert forwarder.forward_once()
    assert put.stored[:4] == pairs(4)
    assert sorted(put.stored[4:]) == sorted(pairs(20))  # nothing skipped in the second
    spool.close()


def test_a_stale_progress_file_is_removed_and_its_number_never_reused(spool_dir):
    # A crash between deleting a forwarded segment 2 and deleting its .pos:
    os.makedirs(spool_dir)
    stale = os.path.join(spool_dir, "spool-%016d.seg.pos" % 2)
    with open(stale, "w") as fh:
        fh.write("ingest-spool-pos 2 2-00 99 00000000\n")
    spool = Spool(spool_dir)
    Forwarder(spool, Put())
    assert not os.path.exists(stale)
    spool.append(pairs(2))
    assert spool.segments() == [3]
    spool.close()


def test_segment_numbers_go_on_after_the_spool_was_emptied(spool_dir):
    spool = Spool(spool_dir)
    spool.append(pairs(3))
    assert Forwarder(spool, Put()).forward_once()
    spool.close()
    for name in os.listdir(spool_dir):                 # even an empty segment file gone
        if name.endswith(".seg"):
            os.unlink(os.path.join(spool_dir, name))
    again = Spool(spool_dir)
    again.append(pairs(1))
    assert again.segments() == [3]                     # 1 was used, 2 the sealed active one
    again.close()


def test_a_damaged_progress_file_means_resending_not_skipping(spool_dir):
    spool, path = sealed(spool_dir, pairs(6))
    with open(path + ".pos", "w") as fh:
        fh.write("ingest-spool-pos 2 garbage 12")
    put = Put()
    assert Forwarder(spool, put).forward_once()
    assert put.stored == pairs(6)
    spool.close()


# ---- dead letters --------------------------------------------------------------------------

def test_a_record_every_server_refuses_becomes_a_dead_letter_and_the_rest_drains(spool_dir):
    records = pairs(10)
    records[3] = ("events", b'{"big":"' + b"x" * 500 + b'"}')
    spool, path = sealed(spool_dir, records)
    put = Put(limit=100)
    forwarder = Forwarder(spool, put, dead_letter_s=0)
    assert not forwarder.forward_once()                # refused once: not yet judged
    assert forwarder.forward_once()                    # refused again, with evidence
    assert put.stored == records[:3] + records[4:]
    (dead,) = [n for n in os.listdir(spool_dir) if n.endswith(".dead")]
    with open(os.path.join(spool_dir, dead), "rb") as fh:
        data = fh.read()
    seg = frames.open_segment(data)
    assert [e[2:] for e in frames.scan(data, seg.body)] == [records[3]]
    assert spool.dead_letters == 1 and not os.path.exists(path)
    spool.close()


def test_a_lone_refused_record_becomes_a_dead_letter_after_dead_letter_s(spool_dir):
    spool, _ = sealed(spool_dir, [("events", b"x" * 500)])
    clock = clock_at(1000.0)
    forwarder = Forwarder(spool, Put(limit=100), dead_letter_s=60, clock=clock)
    assert not forwarder.forward_once()
    clock.now += 59
    assert not forwarder.forward_once()                # no evidence, not long enough
    clock.now += 2
    assert forwarder.forward_once()
    assert spool.dead_letters == 1
    spool.close()


def test_an_outage_never_makes_a_dead_letter(spool_dir):
    spool, _ = sealed(spool_dir, pairs(5))
    clock = clock_at(1000.0)
    put = Put()
    put.down = True
    forwarder = Forwarder(spool, put, dead_letter_s=1, clock=clock)
    for _ in range(5):
        assert not forwarder.forward_once()
        clock.now += 10
    put.down = False
    assert forwarder.forward_once()
    assert put.stored == pairs(5) and spool.dead_letters == 0
    assert not [n for n in os.listdir(spool_dir) if n.endswith(".dead")]
    spool.close()


def test_a_refused_record_alone_in_its_segment_does_not_hold_up_the_next(spool_dir):
    spool = Spool(spool_dir, segment_bytes=1)          # one segment per append
    big = ("events", b'{"big":"' + b"x" * 500 + b'"}')
    spool.append([big])
    spool.append(pairs(20))
    spool.seal_active()
    put = Put(limit=100)
    forwarder = Forwarder(spool, put, dead_letter_s=0)
    assert not forwarder.forward_once()                # the big one held, the rest sent
    assert put.stored == pairs(20) and len(spool.closed_segments()) == 1
    assert forwarder.forward_once()                    # refused again: a dead letter
    assert spool.dead_letters == 1 and spool.closed_segments() == []
    spool.close()


def test_a_full_queue_is_not_mistaken_for_a_too_large_record(spool_dir):
    """Every record of `full` is refused; `other` drains meanwhile; nothing of `full`
    becomes a dead letter, and once there is room it is all delivered."""
    spool, _ = sealed(spool_dir, pairs(5, queue="full") + pairs(5, queue="other"))
    put = Put()

    def refuse_full(batch):
        if put.down:
            raise SinkUnavailable("down", remaining=list(batch))
        refused = [p for p in batch if p[0] == "full"]
        put.stored.extend(p for p in batch if p[0] != "full")
        if refused:
            raise SinkUnavailable("NOT_STORED", remaining=refused, refused=True)

    forwarder = Forwarder(spool, refuse_full, dead_letter_s=0)
    for _ in range(4):
        assert not forwarder.forward_once()
    assert put.stored == pairs(5, queue="other") and spool.dead_letters == 0
    forwarder.put_many = put
    assert forwarder.forward_once()
    assert put.stored == pairs(5, queue="other") + pairs(5, queue="full")
    spool.close()


def test_a_queue_that_took_a_larger_record_is_full_not_too_small(spool_dir):
    small, large = ("events", b"s" * 50), ("events", b"L" * 80)
    spool, _ = sealed(spool_dir, [small, large])
    put = Put()
    answers = iter([[small], [small], [small]])       # `small` refused, `large` stored

    def refuse_small(batch):
        refused = [p for p in batch if p in next(answers, [])]
        put.stored.extend(p for p in batch if p not in refused)
        if refused:
            raise SinkUnavailable("NOT_STORED", remaining=refused, refused=True)

    forwarder = Forwarder(spool, refuse_small, dead_letter_s=0)
    assert not forwarder.forward_once()
    assert not forwarder.forward_once()                # evidence says "full": it waits
    assert spool.dead_letters == 0
    assert forwarder.forward_once()                    # room again
    assert put.stored == [large, small]
    spool.close()


# ---- a failing disk ---------------------------------------------------------------------------

def test_ready_says_so_while_the_spool_cannot_write_and_recovers(spool_dir, monkeypatch):
    from ingest.sinks import spool as spool_module
    clock = clock_at(1000.0)
    primary = MemorySink()
    primary.failing = True
    spool = Spool(spool_dir, clock=clock)
    sink = SpoolingSink(primary, spool)
    real = os.write

    def full(fd, buf):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool_module.os, "write", full)
    with pytest.raises(SinkUnavailable):
        sink.put(pairs(1))
    ok, why = sink.ready()
    assert not ok and "No space left on device" in why and "memory sink" in why
    assert spool.write_errors == 1
    monkeypatch.setattr(spool_module.os, "write", real)
    assert not sink.ready()[0]                         # probed at most once a second
    clock.now += 1.5
    assert sink.ready() == (True, "spooling (memory sink)")
    sink.put(pairs(1))
    spool.close()
