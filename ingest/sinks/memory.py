"""An in-memory sink for unit tests and in-process benchmarks (no I/O)."""
from ingest.sinks import SinkUnavailable


class MemorySink:
    """An in-memory sink for unit tests and in-process benchmarks."""

    def __init__(self):
        self.items = []
        self.failing = False

    def put(self, pairs):
        if self.failing:
            raise SinkUnavailable()
        self.items.extend(pairs)

    def queue(self, name):
        return [payload for queue, payload in self.items if queue == name]

    def ready(self):
        return not self.failing, "memory sink"
