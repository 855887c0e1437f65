"""The per-queue options of `ingest queue` and its --config file (ingest/queue/options.py).

Every mistake an operator can type is a ValueError naming the place, never a TypeError
later on a hot path."""
import pytest

from ingest.queue.options import ConfigSet, QueueOptions

MAX_ITEM = 1000


@pytest.mark.parametrize("data, where", [
    (5, "the file must be a JSON object"),
    ([], "the file must be a JSON object"),
    ({"default": 3}, "default must be a JSON object"),
    ({"queues": []}, "queues must be a JSON object"),
    ({"queues": {"q": "x"}}, "q must be a JSON object"),
    ({"default": {"max_open_transactions": None}}, "max_open_transactions cannot be null"),
    ({"default": {"max_memory_bytes": None}}, "max_memory_bytes cannot be null"),
    ({"default": {"max_memory_bytes": -1}}, "max_memory_bytes must be a non-negative int"),
    ({"default": {"max_items": True}}, "max_items must be a non-negative int"),
    ({"default": {"nope": 1}}, "unknown setting 'nope'"),
    ({"other": {}}, "unknown top-level keys"),
])
def test_mistakes_are_value_errors_naming_the_place(data, where):
    with pytest.raises(ValueError) as err:
        ConfigSet(data, MAX_ITEM)
    assert where in str(err.value)


def test_null_max_item_bytes_means_the_server_default():
    config = ConfigSet({"default": {"max_item_bytes": None},
                        "queues": {"q": {"max_item_bytes": None}}}, MAX_ITEM)
    assert config.buffer_cap == MAX_ITEM
    assert config.for_queue("q").max_item_bytes == MAX_ITEM
    assert config.for_queue("other").max_item_bytes == MAX_ITEM


def test_nulls_mean_no_limit_where_allowed_and_fanout_inherits():
    config = ConfigSet({"default": {"max_items": 5},
                        "queues": {"p": {"max_items": None, "max_memory_bytes": 4096}}},
                       MAX_ITEM)
    child = config.for_queue("p+c")
    assert child.max_items is None and child.max_memory_bytes == 4096
    assert config.for_queue("x").max_items == 5
    assert config.for_queue("x").max_memory_bytes == QueueOptions().max_memory_bytes
