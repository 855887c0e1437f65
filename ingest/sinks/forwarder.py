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

Refused records: Kestrel's NOT_STORED means "queue full" or "item too large" and the
protocol does not say which.  A record every server of the cluster answered NOT_STORED
for (none failed or was skipped: that would be an outage) does not hold up the others:
forwarding goes on with the batches and segments after it, and its segment stays (its
progress not saved past it) until it is resolved.  It becomes a dead letter when it is
refused again after records of its queue were STORED since its first refusal, all of
them smaller than it (the queue takes records, just not this one: too large); or when it
has been refused on every attempt for `dead_letter_s` seconds.  An outage never makes a
dead letter, and a queue that took a record at least as large as a refused one is full,
not too small: that record waits (or reaches `dead_letter_s`).
"""
import logging
import os
import time
import zlib

from ingest.fileio import fsync_dir, write_all
from ingest.sinks import SinkUnavailable
from ingest.sinks import frames
from ingest.sinks.spool import SEGMENT_RE
from ingest.sinks.spool_log import SpoolNotices

log = logging.getLogger("ingest.spool")
POS_TAG = "ingest-spool-pos 2"


# What forwarding a batch or a segment came to.
DONE, HELD, FAILED = "done", "held", "failed"


class Forwarder:
    """Moves spooled records to Kestrel, oldest first; deletes what was STORED."""

    def __init__(self, spool, put_many, batch_records=1000, retry_s=1.0, dead_letter_s=600.0,
                 clock=time.monotonic, notices=None):
        self.spool = spool
        self.notices = notices or SpoolNotices(spool)   # the log lines (spool_log.py)
        self.put_many = put_many
        self.batch_records = batch_records
        self.retry_s = retry_s
        self.dead_letter_s = dead_letter_s
        self.clock = clock
        self.forwarded = 0
        self.stopping = False
        self.stopped = False
        self._unstored = {}      # (segment, batch offset) -> what is not stored yet ([]: done)
        self._held = set()       # segments left with refused records by the last pass
        self._kept_aside = set()  # (segment, offset) of damage already copied and counted
        self._refusals = Refusals(clock, dead_letter_s)
        remove_stale_progress(spool.dir)

    def pending(self):
        return bool(self.spool.closed_segments()) or self.spool.active_bytes() > 0

    def forward_once(self):
        """Forward every closed segment (sealing the active one first when it is the only
        one with data, or the others are held by refused records).  True when all of them
        went through, False when Kestrel failed or refused some (try again later);
        records appended meanwhile wait for the next call."""
        closed = self.spool.closed_segments()
        if not closed or set(closed) <= self._held:
            self.spool.seal_active()
        held = set()
        for seq in self.spool.closed_segments():
            outcome = self._forward_segment(seq)
            if outcome is FAILED:
                return False
            if outcome is HELD:
                held.add(seq)
        self._held = held
        if not held:
            self._refusals.clear()
        return not held

    def _forward_segment(self, seq):
        path = self.spool.path(seq)
        with open(path, "rb") as fh:
            data = fh.read()
        segment = frames.open_segment(data)
        progress = Progress(path + ".pos", segment, data)
        outcome = DONE if segment.empty else self._deliver(seq, path, data, segment, progress)
        if outcome is not DONE:
            return outcome
        os.unlink(path)                      # crash point 4: the segment first,
        progress.remove()                    # then its progress
        self.spool.forgot(seq, len(data))
        for key in [k for k in self._unstored if k[0] == seq]:
            del self._unstored[key]
        return DONE

    def _deliver(self, seq, path, data, segment, progress):
        """Send every frame from the saved progress on, in batches; keep damage aside.
        Progress is saved after each batch, until a batch is held by refused records."""
        start = progress.start()
        batch, batch_start, outcome = [], start, DONE
        for event in frames.scan(data, start, segment.version):
            if event[0] is frames.FRAME:
                batch.append((event[2], event[3]))
                if len(batch) >= self.batch_records:
                    sent = self._send(batch, (seq, batch_start), path)
                    if sent is FAILED:
                        return FAILED
                    if sent is HELD:
                        outcome = HELD
                    elif outcome is DONE:
                        progress.save(event[1])
                    batch, batch_start = [], event[1]
            elif event[0] is frames.DAMAGED:
                self._keep_aside(seq, path, data, event[1], event[2], event[3], segment)
            else:
                log.warning("%s: dropped a torn tail at byte %d of %d (a write cut short by"
                            " a crash; never acknowledged)", path, event[1], len(data))
        if batch:
            sent = self._send(batch, (seq, batch_start), path)
            outcome = sent if sent is not DONE else outcome
        return outcome

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
        """put_many the batch that starts at `key` (segment, offset): DONE, HELD (every
        server refused some: they wait, see the module docstring) or FAILED.  What
        Kestrel stored is never sent again (else every retry would store it again)."""
        pending = self._unstored.get(key, batch)
        if not pending:
            return DONE                      # stored on an earlier pass
        try:
            self.put_many(pending)
        except SinkUnavailable as exc:
            remaining = pending if exc.remaining is None else list(exc.remaining)
            stored = self._stored_part(pending, remaining)
            if not exc.refused:
                self._refusals.outage(key)
                self._unstored[key] = remaining
                return FAILED
            dead = self._refusals.judge(key, remaining)
            self._refusals.stored(stored)
            if dead:
                self._dead_letter(dead, key, path)
                dead_ids = {id(pair) for pair in dead}
                remaining = [pair for pair in remaining if id(pair) not in dead_ids]
            self._unstored[key] = remaining
            return HELD if remaining else DONE
        except Exception as exc:  # a client error must not kill the forwarder
            log.warning("forwarding failed: %s", exc)
            return FAILED
        self._stored_part(pending, ())
        self._refusals.stored(pending)
        self._unstored[key] = []
        return DONE

    def _stored_part(self, pending, remaining):
        unstored = {id(pair) for pair in remaining}
        stored = [pair for pair in pending if id(pair) not in unstored]
        self.forwarded += len(stored)
        return stored

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


class Refusals:
    """What the forwarder knows about records every server refused (module docstring).

    Per queue with refused records: how many of its records were STORED since the first
    refusal, and the largest of them.  Per batch: since when it has been refused."""

    def __init__(self, clock, dead_letter_s):
        self.clock = clock
        self.dead_letter_s = dead_letter_s
        self.queues = {}         # queue -> [records stored since, largest stored]
        self.seen = set()        # id() of pairs refused before
        self.since = {}          # batch key -> first refusal (monotonic seconds)

    def judge(self, key, remaining):
        """The refused pairs of `remaining` that are dead letters now."""
        now = self.clock()
        since = self.since.setdefault(key, now)
        if self.dead_letter_s and now - since >= self.dead_letter_s:
            return list(remaining)
        dead = []
        for pair in remaining:
            queue = self.queues.get(pair[0])
            if queue is None:
                self.queues[pair[0]] = [0, 0]
            elif id(pair) in self.seen and queue[0] and queue[1] < len(pair[1]):
                dead.append(pair)
            self.seen.add(id(pair))
        return dead

    def stored(self, pairs):
        """Note records STORED (evidence that their queue takes records of that size)."""
        if not self.queues:
            return
        for queue, payload in pairs:
            seen = self.queues.get(queue)
            if seen is not None:
                seen[0] += 1
                seen[1] = max(seen[1], len(payload))

    def outage(self, key):
        """A failure that was not a refusal: the clock of `key` starts again."""
        self.since.pop(key, None)

    def clear(self):
        self.queues.clear()
        self.seen.clear()
        self.since.clear()


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
