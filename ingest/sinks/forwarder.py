"""Forwarder: moves spooled records to Kestrel, oldest first; deletes what was STORED.

What it must not do: delete a segment before every record in it was STORED, send a
stored part of a batch again, or die (a dead forwarder would leave the spool to fill).
Its progress inside a segment is kept in a small `.pos` file (not fsynced: losing it only
means re-sending, i.e. duplicates, never loss).  Delivery is at-least-once.
"""
import logging
import os
import time

from ingest.sinks import SinkUnavailable
from ingest.sinks.spool import read_frames, torn_tail
from ingest.sinks.spool_log import SpoolNotices

log = logging.getLogger("ingest.spool")


class Forwarder:
    """Moves spooled records to Kestrel, oldest first; deletes what was STORED."""

    def __init__(self, spool, put_many, batch_records=1000, retry_s=1.0, notices=None):
        self.spool = spool
        self.notices = notices or SpoolNotices(spool)   # the log lines (spool_log.py)
        self.put_many = put_many
        self.batch_records = batch_records
        self.retry_s = retry_s
        self.forwarded = 0
        self.stopping = False
        self.stopped = False
        self._unstored = {}      # (segment, batch offset) -> the part Kestrel did not store

    def pending(self):
        return bool(self.spool.closed_segments()) or self.spool._active_size > 0

    def forward_once(self):
        """Forward every closed segment (sealing the active one first when it is the only
        one with data).  True when all of them went through, False when Kestrel refused
        (try again later); records appended meanwhile wait for the next call."""
        if not self.spool.closed_segments():
            self.spool.seal_active()
        for seq in self.spool.closed_segments():
            if not self._forward_segment(seq):
                return False
        return True

    def _forward_segment(self, seq):
        path = self.spool.path(seq)
        pos_path = path + ".pos"
        with open(path, "rb") as fh:
            data = fh.read()
        start = _read_pos(pos_path)
        batch, end, batch_start = [], start, start
        for end_offset, queue, payload in read_frames(data, start):
            batch.append((queue, payload))
            if len(batch) >= self.batch_records:
                if not self._send(batch, (seq, batch_start)):
                    return False
                _write_pos(pos_path, end_offset)
                batch, batch_start = [], end_offset
            end = end_offset
        if batch and not self._send(batch, (seq, batch_start)):
            return False
        if end != len(data) and not torn_tail(data, end):
            # Damage in the middle (not a crash's torn tail): keep the file for a person.
            log.error("%s: unreadable frame at byte %d of %d; kept as %s.damaged",
                      path, end, len(data), path)
            os.replace(path, path + ".damaged")
        else:
            if end != len(data):
                log.warning("%s: dropped a torn tail at byte %d of %d (written during a crash;"
                            " never acknowledged)", path, end, len(data))
            os.unlink(path)
        if os.path.exists(pos_path):
            os.unlink(pos_path)
        self.spool.forgot(seq, len(data))
        return True

    def _send(self, batch, key):
        """put_many the batch that starts at `key` (segment, offset).  When Kestrel
        stored part of it before failing, only what it did not store is sent next time
        (else every retry would store the stored part again)."""
        unstored = self._unstored.get(key)
        pending = unstored if unstored is not None else batch
        try:
            self.put_many(pending)
        except SinkUnavailable as exc:
            if exc.remaining is not None and len(exc.remaining) < len(pending):
                self._unstored = {key: list(exc.remaining)}
            return False
        except Exception as exc:  # a client error must not kill the forwarder
            log.warning("forwarding failed: %s", exc)
            return False
        self._unstored.pop(key, None)
        self.forwarded += len(pending)
        return True

    def run(self, tick_s=0.05):
        """The background loop: forward when there is data, retry after retry_s.

        No error may end it: a forwarder that died would leave the spool to fill up."""
        while not self.stopping:
            try:
                self._pass(tick_s)
            except Exception as exc:
                log.error("spool forwarder: %s; retrying in %.1fs", exc, self.retry_s)
                self._pause(tick_s)
        self.stopped = True

    def run_syncer(self):
        """For --spool-sync-ms > 0: fsync on its own timer, so a long forward (or a
        forwarder backing off) never stretches the window of unsynced records."""
        period = self.spool.sync_ms / 1000.0
        while not self.stopping:
            time.sleep(min(period, 0.05))
            try:
                self.spool.sync_if_due()
            except Exception as exc:
                log.error("spool fsync: %s", exc)

    def _pause(self, tick_s):
        deadline = time.monotonic() + self.retry_s
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(tick_s)

    def _pass(self, tick_s):
        self.spool.sync_if_due()
        if self.spool.has_data.wait(tick_s):
            done = self.forward_once()
            self.notices.forwarding(self.forwarded)
            if done:
                if not self.pending():
                    self.notices.forwarded_all(self.forwarded)
                    self.spool.has_data.clear()
                    if self.pending():          # an append raced with the clear
                        self.spool.has_data.set()
            else:
                deadline = time.monotonic() + self.retry_s
                while not self.stopping and time.monotonic() < deadline:
                    self.spool.sync_if_due()
                    time.sleep(tick_s)


def _read_pos(path):
    try:
        with open(path, "rb") as fh:
            return int(fh.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def _write_pos(path, offset):
    with open(path, "w") as fh:
        fh.write(str(offset))
