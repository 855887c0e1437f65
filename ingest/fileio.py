"""Two file-durability primitives shared by the spool and the queue server's journals.

Plain os calls; no eventlet (callers decide what runs off the event loop)."""
import os


def write_all(fd, data, write=None):
    """Write every byte of `data` to `fd`, looping on short writes; errors propagate
    (the caller decides what a half-written buffer means).  `write` defaults to os.write,
    looked up at each call."""
    write = write or os.write
    view = memoryview(data)
    while view:
        n = write(fd, view)
        view = view[n:]


def fsync_dir(path):
    """fsync a directory, so a file created or renamed in it survives a crash."""
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
