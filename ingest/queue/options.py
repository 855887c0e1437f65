"""Per-queue options of `ingest queue` and the JSON `--config` file that sets them.

What it is for: every queue gets one frozen QueueOptions, resolved as
    the server's defaults  <-  the file's "default"  <-  the fanout parent's entry
    (for `parent+child`)   <-  the queue's own entry under "queues".
The file looks like {"default": {...}, "queues": {"name": {...}}}; every key is a field
of QueueOptions, every value a non-negative integer (or a boolean where the default is
one); null means "no limit" where a field allows it, and for max_item_bytes "the
server's --max-item-bytes".  Anything else is a ValueError naming the key.  A reload
builds a new ConfigSet and new QueueOptions for each queue; nothing is changed in place.

What it must not do: touch queues, files other than the --config file, sockets or
eventlet, or read the environment.
"""
import dataclasses
import json
from typing import Optional

DEFAULT_MAX_ITEM_BYTES = 16 * 1024 * 1024


def _option(default, kind, meaning, nullable=False):
    """A field with its default, the JSON type a --config value must have (and whether
    null is allowed), and what it means (docs/reference/settings.md is generated from
    it)."""
    return dataclasses.field(default=default, metadata={"kind": kind, "help": meaning,
                                                        "nullable": nullable})


@dataclasses.dataclass(frozen=True, slots=True)
class QueueOptions:
    """The settings of one queue."""

    max_items: Optional[int] = _option(None, int, "most items queued; then a set is refused"
                                       " (NOT_STORED) or, with discard_old_when_full, the"
                                       " oldest items are dropped", nullable=True)
    max_bytes: Optional[int] = _option(None, int, "most bytes of item data queued; full as"
                                       " for max_items", nullable=True)
    max_item_bytes: Optional[int] = _option(None, int, "largest item accepted (NOT_STORED"
                                            " beyond it); default and null:"
                                            " --max-item-bytes", nullable=True)
    discard_old_when_full: bool = _option(False, bool, "when full, drop the oldest items"
                                          " instead of refusing new ones")
    max_age_ms: Optional[int] = _option(None, int, "items expire this long after they were"
                                        " added (a shorter client expiry still wins)",
                                        nullable=True)
    max_open_transactions: int = _option(100, int, "open reliable reads per connection and"
                                         " queue; one more is answered ERROR")
    max_memory_bytes: int = _option(32 * 1024 * 1024, int, "memory the queue's items may"
                                    " take (data + about 90 bytes each); newer items stay"
                                    " only in the journal and are read back in order"
                                    " (read-behind)")
    drained_journal_bytes: int = _option(1024 * 1024, int, "the journal of a drained queue"
                                         " (no items, no open reads) is truncated once this"
                                         " big")
    compact_journal_bytes: int = _option(16 * 1024 * 1024, int, "a journal bigger than this"
                                         " and bigger than 4x its live records is rewritten"
                                         " (in the background)")


# name -> the type a --config value must have; the one list of known settings
KINDS = {f.name: f.metadata["kind"] for f in dataclasses.fields(QueueOptions)}
NULLABLE = {f.name for f in dataclasses.fields(QueueOptions) if f.metadata["nullable"]}


def describe():
    """(name, default, meaning) of every option, for the reference page."""
    return [(f.name, f.default, f.metadata["help"]) for f in dataclasses.fields(QueueOptions)]


class ConfigSet:
    """The parsed --config file: defaults, per-queue overrides, fanout inheritance.

    `default` and `queues` hold the merged and the raw per-queue values (dicts, never
    changed after construction); `buffer_cap` is the largest data block a connection
    will ever buffer.
    """

    def __init__(self, data, max_item_bytes):
        data = {} if data is None else data
        _need_object(data, "the file")
        unknown = set(data) - {"default", "queues"}
        if unknown:
            raise ValueError("unknown top-level keys %s" % sorted(unknown))
        base = {f.name: f.default for f in dataclasses.fields(QueueOptions)}
        base["max_item_bytes"] = max_item_bytes
        self.default = _merge(base, data.get("default"), "default", max_item_bytes)
        queues = {} if data.get("queues") is None else data["queues"]
        _need_object(queues, "queues")
        self.queues = {name: _merge({}, spec, name, max_item_bytes)
                       for name, spec in queues.items()}
        self.buffer_cap = max([self.default["max_item_bytes"]] + [
            spec["max_item_bytes"] for spec in self.queues.values()
            if spec.get("max_item_bytes") is not None])

    def for_queue(self, name):
        """default -> fanout parent's settings -> the queue's own settings."""
        values = dict(self.default)
        if "+" in name:
            values.update(self.queues.get(name.split("+", 1)[0], {}))
        values.update(self.queues.get(name, {}))
        return QueueOptions(**values)


def _need_object(value, where):
    if not isinstance(value, dict):
        raise ValueError("%s must be a JSON object, not %s" % (where, type(value).__name__))


def _merge(base, spec, where, max_item_bytes):
    spec = {} if spec is None else spec
    _need_object(spec, where)
    out = dict(base)
    for key, value in spec.items():
        if key not in KINDS:
            raise ValueError("%s: unknown setting %r" % (where, key))
        kind = KINDS[key]
        if value is None and key not in NULLABLE:
            raise ValueError("%s: %s cannot be null" % (where, key))
        if value is not None and (not isinstance(value, kind) or
                                  (kind is int and (isinstance(value, bool) or value < 0))):
            raise ValueError("%s: %s must be a non-negative %s" % (where, key, kind.__name__))
        out[key] = max_item_bytes if key == "max_item_bytes" and value is None else value
    return out


def load_config(path, max_item_bytes):
    """The ConfigSet of the file at `path` (none: only the defaults).  Raises OSError or
    ValueError with a message naming what is wrong."""
    if not path:
        return ConfigSet({}, max_item_bytes)
    with open(path, "rb") as fh:
        return ConfigSet(json.loads(fh.read().decode("utf-8")), max_item_bytes)
