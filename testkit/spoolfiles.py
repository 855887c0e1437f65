"""Spool files for tests and benchmarks: what an earlier version wrote, where each frame
starts, and the dirty faults (a flipped byte) a disk can inflict.

Plain file and byte operations over ingest/sinks/frames.py's format; no sockets.  It
must not be used by ingest/ itself: writing the old format is for tests only (the
worker reads it, never writes it).
"""
import os
import struct
import zlib

from ingest.sinks import frames

_V1 = struct.Struct("<IIH")


def legacy_frame(queue, payload):
    """One frame as versions before the format-2 spool wrote it (no header CRC)."""
    q = queue.encode("utf-8")
    return _V1.pack(len(payload), zlib.crc32(payload, zlib.crc32(q)), len(q)) + q + payload


def legacy_segment(path, pairs):
    """Write a format-1 segment holding `pairs` at `path`."""
    with open(path, "wb") as fh:
        fh.write(b"".join(legacy_frame(q, p) for q, p in pairs))
    return path


def frame_offsets(path):
    """Start offset of every good frame of a segment file, in order."""
    with open(path, "rb") as fh:
        data = fh.read()
    segment = frames.open_segment(data)
    starts, pos = [], segment.body
    for event in frames.scan(data, segment.body, segment.version):
        if event[0] is frames.FRAME:
            starts.append(pos)
            pos = event[1]
        elif event[0] is frames.DAMAGED:
            pos = event[2]
    return starts


def flip(path, offset, mask=0x80):
    """XOR one byte of a file in place (a bit rot, a bad sector, a stray write)."""
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ mask]))


def length_byte(frame_start, version=frames.VERSION):
    """Offset of the high byte of a frame's payload length (little-endian u32)."""
    return frame_start + (len(frames.SYNC) + 3 if version == frames.VERSION else 3)


def spool_files(directory, suffix):
    return sorted(n for n in os.listdir(directory) if n.endswith(suffix))
