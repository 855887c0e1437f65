"""The spool's on-disk format: segment header, frames, and reading them back through damage.

What it is for: ingest/sinks/spool.py writes with `segment_header` and `encode_frame`;
ingest/sinks/forwarder.py reads with `open_segment` and `scan`.  Plain bytes in, values
out: no files, no clock, no logging.

Format 2 (written by this version), all integers little-endian:

    segment header (34 bytes, written with the segment's first frames):
        magic b"\\xffISG", version u16 (2), sequence number u64, segment id (16 random
        bytes), crc32 of the 30 bytes before it
    frame (18-byte header, then the queue name, then the payload):
        sync b"\\xfe\\xffSF", payload length u32, queue-name length u16,
        crc32(queue name + payload) u32, crc32 of the 14 header bytes before it u32

Why each part: the header CRC means a flipped length byte is found as damage instead of
being believed (a wrong length would send the reader past every later frame); the sync
marker (0xFE and 0xFF never occur in UTF-8, so never in a JSON record) lets the reader
find the next frame after damage and deliver everything after it.  So a scan tells three
things apart:

- a frame: header CRC, bounds and payload CRC all good;
- a torn tail: what follows the last good frame is the start of one frame cut short by
  the end of the file (a prefix of the sync marker, or a header whose CRC is good but
  whose frame runs past the end), or zeros (a file extended by a crash that never wrote
  the data).  A crash mid-append leaves exactly that, and such a frame was never
  acknowledged;
- damage: anything else, reported as a byte range; the scan resumes at the next good
  frame.

Format 1 (written by earlier versions; read so that a worker upgraded with a non-empty
spool forwards it): frames of payload length u32, crc32 u32, queue-name length u16, no
segment header.  It has no header check, so it cannot tell a torn tail from damage: every
unreadable range, the tail included, is reported as damage (kept aside, never dropped),
and the scan resynchronises by trying every later offset for a frame whose CRC matches.

What it must not do: trust a length it has not checked, or call a range torn unless it
is provably the start of a single frame cut off by the end of the file.
"""
import dataclasses
import struct
import zlib

MAGIC = b"\xffISG"
VERSION = 2
_HEAD = struct.Struct("<4sHQ16s")
SEGMENT_HEADER_BYTES = _HEAD.size + 4
SYNC = b"\xfe\xffSF"
_PRE = struct.Struct("<4sIH I")      # sync, payload length, queue length, payload crc
_CRC = struct.Struct("<I")
FRAME_HEADER_BYTES = _PRE.size + 4
MAX_FRAME_PAYLOAD = 64 * 1024 * 1024

V1_HEADER = struct.Struct("<IIH")     # format 1: payload length, crc32, queue length

# scan() events
FRAME, DAMAGED, TORN = "frame", "damaged", "torn"


def segment_header(seq, segment_id):
    head = _HEAD.pack(MAGIC, VERSION, seq, segment_id)
    return head + _CRC.pack(zlib.crc32(head))


def encode_frame(queue, payload):
    q = queue.encode("utf-8")
    pre = _PRE.pack(SYNC, len(payload), len(q), zlib.crc32(payload, zlib.crc32(q)))
    return pre + _CRC.pack(zlib.crc32(pre)) + q + payload


@dataclasses.dataclass(frozen=True)
class Segment:
    """What the start of a segment file says about it.

    `version` 1 or 2; `seq` and `segment_id` from a good format-2 header (None
    otherwise); `body` the offset of the first frame; `empty` when the file holds no
    frame at all (a crash right after it was created)."""

    version: int
    seq: int = None
    segment_id: bytes = None
    body: int = 0
    empty: bool = False

    @property
    def identity(self):
        """What a progress file must name to apply to this segment (None: nothing can)."""
        if self.segment_id is None:
            return None
        return "%d-%s" % (self.seq, self.segment_id.hex())


def open_segment(data):
    """Tell format 2 from format 1 (and from an empty or half-created file)."""
    n = len(data)
    if data[:4] == MAGIC[:min(n, 4)]:            # format 2, or nothing yet
        if n < SEGMENT_HEADER_BYTES:
            return Segment(VERSION, body=n, empty=True)      # created, never written
        if _good_segment_header(data):
            seq, segment_id = _HEAD.unpack_from(data, 0)[2:]
            return Segment(VERSION, seq, segment_id, SEGMENT_HEADER_BYTES,
                           empty=n == SEGMENT_HEADER_BYTES)
        # A damaged header: no progress can be trusted, the frames still can.
        body = SEGMENT_HEADER_BYTES if is_boundary(data, SEGMENT_HEADER_BYTES, VERSION) else 0
        return Segment(VERSION, body=body)
    if _v1_frame_end(data, 0) is not None:
        return Segment(1)
    at = data.find(SYNC)
    if at != -1 and _frame_end(data, at, full=True) is not None:
        return Segment(VERSION, body=SEGMENT_HEADER_BYTES if at == SEGMENT_HEADER_BYTES else 0)
    return Segment(1)


def _good_segment_header(data):
    head = bytes(data[:_HEAD.size])
    return len(data) >= SEGMENT_HEADER_BYTES and \
        _CRC.unpack_from(data, _HEAD.size)[0] == zlib.crc32(head)


def is_boundary(data, offset, version):
    """Can a scan start at `offset`: the end of the data or the start of a good frame?"""
    if offset == len(data):
        return True
    if version == 1:
        return _v1_frame_end(data, offset) is not None
    return _frame_end(data, offset, full=True) is not None


def scan(data, start, version=VERSION):
    """Every event from `start` to the end of `data`, in order:

        (FRAME, end, queue, payload)   a good frame ending at `end`
        (DAMAGED, begin, end, frames)  unreadable bytes [begin, end); `frames` is how many
                                       frames they held, as far as can be told (>= 1)
        (TORN, begin)                  [begin, len) is one frame cut short by the end
    """
    if version == 1:
        yield from _scan_v1(data, start)
        return
    n, pos = len(data), start
    view = memoryview(data)
    unpack, crc32 = _PRE.unpack_from, zlib.crc32
    pre_size, size = _PRE.size, FRAME_HEADER_BYTES
    while pos < n:
        # PERF: the common case inline (one unpack, two CRCs, no function call).
        if pos + size <= n:
            sync, length, qlen, dcrc = unpack(data, pos)
            if sync == SYNC and _CRC.unpack_from(data, pos + pre_size)[0] == \
                    crc32(view[pos:pos + pre_size]):
                q0 = pos + size
                end = q0 + qlen + length
                if end > n:
                    yield (TORN, pos)
                    return
                if crc32(view[q0 + qlen:end], crc32(view[q0:q0 + qlen])) == dcrc:
                    yield (FRAME, end, bytes(view[q0:q0 + qlen]).decode("utf-8", "replace"),
                           bytes(view[q0 + qlen:end]))
                    pos = end
                    continue
                yield (DAMAGED, pos, end, 1)       # the header vouches for the length
                pos = end
                continue
        nxt = _next_frame(data, pos + 1)
        if nxt is None:
            if _torn(data, pos):
                yield (TORN, pos)
            else:
                yield (DAMAGED, pos, n, max(1, data.count(SYNC, pos, n)))
            return
        yield (DAMAGED, pos, nxt, max(1, data.count(SYNC, pos, nxt)))
        pos = nxt


def _frame_end(data, pos, full):
    """The end of a frame at `pos` whose header is good (and, when `full`, which fits in
    the data with a good payload CRC); None otherwise."""
    n = len(data)
    if pos + FRAME_HEADER_BYTES > n:
        return None
    sync, length, qlen, dcrc = _PRE.unpack_from(data, pos)
    if sync != SYNC or _CRC.unpack_from(data, pos + _PRE.size)[0] != \
            zlib.crc32(bytes(data[pos:pos + _PRE.size])):
        return None
    q0 = pos + FRAME_HEADER_BYTES
    end = q0 + qlen + length
    if full and (end > n or zlib.crc32(bytes(data[q0 + qlen:end]),
                                       zlib.crc32(bytes(data[q0:q0 + qlen]))) != dcrc):
        return None
    return end


def _next_frame(data, pos):
    """The offset of the next whole good frame at or after `pos`, or None."""
    at = data.find(SYNC, pos)
    while at != -1:
        if _frame_end(data, at, full=True) is not None:
            return at
        at = data.find(SYNC, at + 1)
    return None


def _torn(data, pos):
    """Is [pos, end) one frame cut off by the end of the file (or never-written zeros)?"""
    rest = data[pos:]
    if len(rest) < FRAME_HEADER_BYTES:
        return bytes(rest[:len(SYNC)]) == SYNC[:min(len(rest), len(SYNC))] or not rest.strip(b"\0")
    if not bytes(rest).strip(b"\0"):
        return True
    end = _frame_end(data, pos, full=False)
    return end is not None and end > len(data)


# ---- format 1 ---------------------------------------------------------------------------

def _v1_frame_end(data, pos):
    n = len(data)
    if pos + V1_HEADER.size > n:
        return None
    length, crc, qlen = V1_HEADER.unpack_from(data, pos)
    end = pos + V1_HEADER.size + qlen + length
    if length > MAX_FRAME_PAYLOAD or end > n:
        return None
    q0 = pos + V1_HEADER.size
    if zlib.crc32(bytes(data[q0 + qlen:end]), zlib.crc32(bytes(data[q0:q0 + qlen]))) != crc:
        return None
    return end


def _scan_v1(data, start):
    n, pos = len(data), start
    while pos < n:
        end = _v1_frame_end(data, pos)
        if end is not None:
            q0 = pos + V1_HEADER.size
            qlen = V1_HEADER.unpack_from(data, pos)[2]
            yield (FRAME, end, bytes(data[q0:q0 + qlen]).decode("utf-8", "replace"),
                   bytes(data[q0 + qlen:end]))
            pos = end
            continue
        nxt = pos + 1
        while nxt < n and _v1_frame_end(data, nxt) is None:
            nxt += 1
        yield (DAMAGED, pos, nxt, 1)
        pos = nxt
