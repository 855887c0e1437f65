"""Forwarder: moves spooled records to Kestrel, oldest first; deletes what was STORED.

What it must not do: delete a segment before every record in it was STORED or kept
aside, send a stored part of a batch again, apply one segment's progress to another
file, or die (a dead forwarder would leave the spool to fill).  Delivery is
at-least-once.

Files beside a segment `spool-N.seg` (ingest/sinks/spool.py writes the segments):

    spool-N.seg.pos             progress: the offset after the last batch STORED, and
                                the identity of the segment it belongs to (its number
                                and the 16 random bytes of its header)
    spool-N.seg@B.damaged       the unreadable bytes found at offset B, kept for a person
    spool-N.seg@B.R.dead        dead letters: records every Kestrel server refused
                                (NOT_STORED), in spool format, from the batch at B

The progress file is written to a temporary name and renamed (never half-written), and
is not fsynced: losing it only means re-sending, i.e. duplicates.  It is used only when
it names this very segment and its offset is where a good frame starts (or the end), so a
stale one from a deleted segment, or one from an earlier version, cannot make the reader
start inside a frame.

Crash points, in the order things happen for a segment:

1. after a batch is STORED, before its progress is saved: the batch is sent again
   (duplicates).
2. after damage is found: its bytes are copied to `.damaged` (written, fsynced, renamed)
   before any progress past them is saved; a crash before that re-finds the damage.
3. a dead letter is written (fsynced, renamed) before progress past its batch is saved;
   a crash before that refuses and writes it again (a duplicate dead letter at worst).
4. the segment is deleted first, then its `.pos`.  A crash between the two leaves a
   `.pos` with no segment: it names a segment number that is never handed out again,
   and is removed when a Forwarder starts.  (Deleting the `.pos` first would risk a
   whole segment sent twice; deleting the segment first risks nothing.)

Dead letters: Kestrel's NOT_STORED means "queue full" or "item too large" and the
protocol does not say which.  A record is a dead letter only when every server of the
cluster answered (none failed or was skipped) and refused it, and either (a) on two
attempts in a row, the first of which showed that its queue takes other records (a later
record of the same queue in the same pipelined write was STORED), or (b) on every
attempt for `dead_letter_s` seconds.  An outage never makes a dead letter.
"""
import logging
import os
import time
import zlib

from ingest.fileio import fsync_dir, write_all
from ingest.sinks import SinkUnavailable
from ingest.sinks import frames
from ingest.sinks.spool import SEGMENT_RE

log = logging.getLogger("ingest.spool")
POS_TAG = "ingest-spool-pos 2"


class Forwarder:
    """Moves spooled records to Kestrel, oldest first; deletes what was STORED."""

    def __init__(self, spool, put_many, batch_records=1000, retry_s=1.0, dead_letter_s=600.0,
                 clock=time.monotonic):
        self.spool = spool
        self.put_many = put_many
        self.batch_records = batch_records
        self.retry_s = retry_s
        self.dead_letter_s = dead_letter_s
        self.clock = clock
        self.forwarded = 0
        self.stopping = False
        self.stopped = False
        self._unstored = {}      # (segment, batch offset) -> the part Kestrel did not store
        self._refused = {}       # (segment, batch offset) -> (refused since, {id(pair)})
        self._kept_aside = set()  # (segment, offset) of damage already copied and counted
        remove_stale_progress(spool.dir)

    def pending(self):
        return bool(self.spool.closed_segments()) or self.spool.active_bytes() > 0

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
        with open(path, "rb") as fh:
            data = fh.read()
        segment = frames.open_segment(data)
        progress = Progress(path + ".pos", segment, data)
        if not segment.empty and not self._deliver(seq, path, data, segment, progress):
            return False
        os.unlink(path)                      # crash point 4: the segment first,
        progress.remove()                    # then its progress
        self.spool.forgot(seq, len(data))
        return True

    def _deliver(self, seq, path, data, segment, progress):
        """Send every frame from the saved progress on, in batches; keep damage aside."""
        start = progress.start()
        batch, batch_start = [], start
        for event in frames.scan(data, start, segment.version):
            if event[0] is frames.FRAME:
                batch.append((event[2], event[3]))
                if len(batch) >= self.batch_records:
                    if not self._send(batch, (seq, batch_start), path):
                        return False
                    progress.save(event[1])
                    batch, batch_start = [], event[1]
            elif event[0] is frames.DAMAGED:
                self._keep_aside(seq, path, data, event[1], event[2], event[3], segment)
            else:
                log.warning("%s: dropped a torn tail at byte %d of %d (a write cut short by"
                            " a crash; never acknowledged)", path, event[1], len(data))
        return not batch or self._send(batch, (seq, batch_start), path)

    def _keep_aside(self, seq, path, data, begin, end, count, segment):
        """Copy unreadable bytes to `<segment>@<offset>.damaged`, log and count them."""
        target = "%s@%d.damaged" % (path, begin)
        write_durably(target, data[begin:end])
        if (seq, begin) in self._kept_aside:
            return
        self._kept_aside.add((seq, begin))
        self.spool.damaged_records += count
        self.spool.damaged_bytes += end - begin
        why = "" if segment.version == frames.VERSION else \
            " (an old-format segment: a torn tail cannot be told from damage)"
        log.error("%s: %d unreadable bytes at %d (about %d record(s) lost)%s; kept in %s;"
                  " the records after them are forwarded", path, end - begin, begin, count,
                  why, os.path.basename(target))

    def _send(self, batch, key, path):
        """put_many the batch that starts at `key` (segment, offset).  When Kestrel
        stored part of it before failing, only what it did not store is sent next time
        (else every retry would store the stored part again)."""
        pending = self._unstored.get(key, batch)
        try:
            self.put_many(pending)
        except SinkUnavailable as exc:
            remaining = pending if exc.remaining is None else list(exc.remaining)
            self.forwarded += len(pending) - len(remaining)
            if exc.refused:
                dead = self._judge(key, pending, remaining)
                if dead:
                    self._dead_letter(dead, key, path)
                    dead_ids = {id(pair) for pair in dead}
                    remaining = [pair for pair in remaining if id(pair) not in dead_ids]
            else:
                since, evidence = self._refused.get(key, (None, set()))
                self._refused[key] = (None, evidence)     # an outage restarts the clock
            if remaining:
                self._unstored[key] = remaining
                return False
        except Exception as exc:  # a client error must not kill the forwarder
            log.warning("forwarding failed: %s", exc)
            return False
        else:
            self.forwarded += len(pending)
        self._unstored.pop(key, None)
        self._refused.pop(key, None)
        return True

    def _judge(self, key, pending, remaining):
        """The refused records of `remaining` that are dead letters now (see the module
        docstring): evidence from an earlier attempt, or refused for dead_letter_s."""
        now = self.clock()
        since, evidence = self._refused.get(key, (None, set()))
        since = now if since is None else since
        if self.dead_letter_s and now - since >= self.dead_letter_s:
            dead = list(remaining)
        else:
            dead = [pair for pair in remaining if id(pair) in evidence]
        self._refused[key] = (since, evidence | refused_alone(pending, remaining))
        return dead

    def _dead_letter(self, dead, key, path):
        target = "%s@%d.%s.dead" % (path, key[1], os.urandom(4).hex())
        body = b"".join(frames.encode_frame(q, p) for q, p in dead)
        write_durably(target, frames.segment_header(key[0], os.urandom(16)) + body)
        self.spool.dead_letters += len(dead)
        queues = sorted({q for q, _ in dead})
        log.error("%d record(s) for queue %s refused by every Kestrel server (NOT_STORED:"
                  " larger than the servers' item limit, or a queue full for long); moved"
                  " to the dead-letter file %s; the rest of the spool goes on",
                  len(dead), ",".join(queues), os.path.basename(target))

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
            if self.forward_once():
                if not self.pending():
                    self.spool.has_data.clear()
                    if self.pending():          # an append raced with the clear
                        self.spool.has_data.set()
            else:
                deadline = time.monotonic() + self.retry_s
                while not self.stopping and time.monotonic() < deadline:
                    self.spool.sync_if_due()
                    time.sleep(tick_s)


def refused_alone(pending, remaining):
    """ids of the refused pairs that a later pair of the same queue was STORED after, in
    the same write: the queue took records, so the refusal is about this record."""
    unstored = {id(pair) for pair in remaining}
    stored_queues, out = set(), set()
    for pair in reversed(pending):
        if id(pair) in unstored:
            if pair[0] in stored_queues:
                out.add(id(pair))
        else:
            stored_queues.add(pair[0])
    return out


class Progress:
    """Forwarding progress inside one segment, kept in `<segment>.pos` and bound to it."""

    def __init__(self, path, segment, data):
        self.path = path
        self.segment = segment
        self.data = data
        # A segment with no good header (format 1, or damaged) is named by its first bytes.
        self.identity = segment.identity or "crc-%08x" % zlib.crc32(data[:65536])

    def start(self):
        """Where forwarding resumes: the saved offset when it is valid, else the start."""
        saved = self._read()
        body = self.segment.body
        if saved is None:
            return body
        if body <= saved <= len(self.data) and \
                frames.is_boundary(self.data, saved, self.segment.version):
            return saved
        log.warning("%s: ignored (offset %d is not a frame boundary of this segment);"
                    " forwarding the segment from its start", self.path, saved)
        return body

    def _read(self):
        try:
            with open(self.path, "rb") as fh:
                text = fh.read(200).decode("ascii").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError):
            return self._stale("unreadable")
        if text.isdigit():        # an earlier version's bare offset: format-1 segments only
            return int(text) if self.segment.version == 1 else self._stale("old format")
        body, _, crc = text.rpartition(" ")
        if not text.startswith(POS_TAG + " ") or "%08x" % zlib.crc32(body.encode()) != crc:
            return self._stale("damaged")
        identity, _, offset = body[len(POS_TAG) + 1:].rpartition(" ")
        if identity != self.identity:
            return self._stale("it belongs to another segment (%s)" % identity)
        return int(offset) if offset.isdigit() else self._stale("damaged")

    def _stale(self, why):
        log.warning("%s: ignored (%s); forwarding the segment from its start", self.path, why)
        return None

    def save(self, offset):
        body = "%s %s %d" % (POS_TAG, self.identity, offset)
        with open(self.path + ".tmp", "w") as fh:
            fh.write("%s %08x\n" % (body, zlib.crc32(body.encode())))
        os.replace(self.path + ".tmp", self.path)

    def remove(self):
        for path in (self.path, self.path + ".tmp"):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def write_durably(path, data):
    """Write a whole file under a temporary name, fsync it, rename it into place."""
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(path + ".tmp", path)
    fsync_dir(os.path.dirname(path))


def remove_stale_progress(directory):
    """Delete `.pos` files whose segment is gone (crash point 4)."""
    names = set(os.listdir(directory))
    for name in names:
        base = name[:-8] if name.endswith(".pos.tmp") else name[:-4] if name.endswith(".pos") \
            else None
        if base and SEGMENT_RE.match(base) and base not in names:
            log.info("removing %s: its segment was forwarded and deleted", name)
            try:
                os.unlink(os.path.join(directory, name))
            except FileNotFoundError:
                pass
