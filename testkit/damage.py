"""Damage files on purpose, for the tests of what a server does with bad bytes.

It changes only the file and the offset it is given, in place, and nothing else.
"""


def flip_byte(path, offset, mask=0x20):
    """XOR the byte at `offset` of the file at `path` with `mask`."""
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes((byte ^ mask,)))
