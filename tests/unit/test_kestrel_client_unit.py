"""Kestrel client pieces that need no socket: parsing, command building, names,
server choice and back-off (with an injected clock), and the write failover bookkeeping."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.commands import consume, stats
from ingest.kestrel import client as kc
from ingest.kestrel import errors, protocol
from ingest.kestrel.cluster import ServerSet


class Clock:
    def __init__(self, now=100.0):
        self.now = now

    def __call__(self):
        return self.now


# ---- servers, names, commands ------------------------------------------------------------

def test_parse_servers_accepts_list_and_comma_string():
    assert protocol.parse_servers(["a:1", " b:22133 "]) == [("a", 1), ("b", 22133)]
    assert protocol.parse_servers("127.0.0.1:5,h:6,") == [("127.0.0.1", 5), ("h", 6)]
    assert protocol.parse_servers("[::1]:7") == [("::1", 7)]


@pytest.mark.parametrize("bad", ["", "host", "host:", ":1", "h:0", "h:70000", "h:x", [","]])
def test_parse_servers_rejects_bad_entries(bad):
    with pytest.raises(ValueError):
        protocol.parse_servers(bad)


@pytest.mark.parametrize("name", ["events", "a-b_c", "Q+fan", "x" * 200, "événements"])
def test_valid_queue_names(name):
    assert protocol.check_queue(name) == name.encode("utf-8")


@pytest.mark.parametrize("name", ["", "a.b", "a/b", "a~b", "a b", "a\r\nb", "x" * 201,
                                  b"bytes", None])
def test_invalid_queue_names_raise_before_io(name):
    with pytest.raises(errors.InvalidQueueName):
        protocol.check_queue(name)
    assert issubclass(errors.InvalidQueueName, ValueError)


def test_get_command_options():
    assert protocol.get_command("q") == b"get q\r\n"
    assert protocol.get_command("q", 0) == b"get q\r\n"
    assert protocol.get_command("q", 250) == b"get q/t=250\r\n"
    assert protocol.get_command("q", 500, open_=True, close=True) == b"get q/close/open/t=500\r\n"
    assert protocol.get_command("q", open_=True) == b"get q/open\r\n"
    assert protocol.get_command("q", close=True) == b"get q/close\r\n"
    assert protocol.get_command("q", abort=True) == b"get q/abort\r\n"
    assert protocol.get_command("q", 100, peek=True) == b"get q/peek/t=100\r\n"
    with pytest.raises(errors.InvalidQueueName):
        protocol.get_command("q/open")


def test_build_sets_exact_bytes_binary_and_empty():
    pairs = [("a", b"x\r\ny"), ("b", b""), ("a", b"\x00\xff")]
    assert protocol.build_sets(pairs) == (b"set a 0 0 4\r\nx\r\ny\r\n" b"set b 0 0 0\r\n\r\n"
                                          b"set a 0 0 2\r\n\x00\xff\r\n")
    assert protocol.build_sets([("q", b"z")], expire=30) == b"set q 0 30 1\r\nz\r\n"
    assert protocol.build_sets([("q", "é")]) == b"set q 0 0 2\r\n\xc3\xa9\r\n"
    with pytest.raises(TypeError):
        protocol.build_sets([("q", 7)])
    with pytest.raises(errors.InvalidQueueName):
        protocol.build_sets([("ok", b"1"), ("bad name", b"2")])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["ab", "events", "q1"]),
                          st.one_of(st.binary(max_size=64), st.integers(0, 9000).map(
                              lambda n: b"x" * n))), max_size=20),
       st.sampled_from([0, 30, 2000000000]), st.booleans())
def test_build_sets_writes_each_pair_as_its_own_set_command(pairs, expire, equal_names):
    """Runs of one queue share a prefix and the usual lengths' lines are cached: the
    buffer is still one `set` per pair, in order, whether the names are the same object
    or only equal, for lengths on both sides of the cache's bound."""
    if equal_names:   # equal strings, not the same object (as the spool's; 2+ characters,
        # as a one-character string is always the cached one)
        pairs = [("".join(list(q)), d) for q, d in pairs]
    expected = b"".join(b"set %s 0 %d %d\r\n%s\r\n" % (q.encode(), expire, len(d), d)
                        for q, d in pairs)
    assert protocol.build_sets(pairs, expire) == expected
    assert all(n < protocol._LENGTH_LINES_BELOW for n in protocol._LENGTH_LINES)


def test_a_bad_name_after_a_run_of_good_ones_is_refused():
    with pytest.raises(errors.InvalidQueueName):
        protocol.build_sets([("ok", b"1"), ("ok", b"2"), ("bad/name", b"3")])


def test_as_bytes():
    assert protocol.as_bytes(b"a") == b"a"
    assert protocol.as_bytes("é") == b"\xc3\xa9"
    assert protocol.as_bytes(bytearray(b"z")) == b"z"
    with pytest.raises(TypeError):
        protocol.as_bytes(5)


# ---- reply parsing -------------------------------------------------------------------------

def test_split_reply_lines_keeps_partial_and_leftover():
    assert protocol.split_reply_lines(b"STORED\r\nSTORED\r\nSTO", 3) == ([b"STORED", b"STORED"], b"STO")
    assert protocol.split_reply_lines(b"STORED\r\nSTORED\r\nX", 1) == ([b"STORED"], b"STORED\r\nX")
    assert protocol.split_reply_lines(b"", 2) == ([], b"")


def test_count_stored():
    assert protocol.count_stored([b"STORED"] * 3) == ([0, 1, 2], None)
    assert protocol.count_stored([b"STORED", b"NOT_STORED", b"STORED"]) == ([0, 2], None)
    assert protocol.count_stored([b"STORED", b"SERVER_ERROR read-only", b"STORED"]) == (
        [0], b"SERVER_ERROR read-only")


def test_unstored_keeps_order():
    pairs = [("q", b"%d" % i) for i in range(5)]
    assert kc.unstored(pairs, [0, 2]) == [pairs[1], pairs[3], pairs[4]]
    assert kc.unstored(pairs, []) == pairs


def test_parse_value_header():
    assert protocol.parse_value_header(b"END") is None
    assert protocol.parse_value_header(b"VALUE q 0 12") == 12
    with pytest.raises(errors.KestrelServerError) as e:
        protocol.parse_value_header(b"CLIENT_ERROR close current item first")
    assert not e.value.server_side
    with pytest.raises(errors.KestrelServerError) as e:
        protocol.parse_value_header(b"SERVER_ERROR quiescent")
    assert e.value.server_side
    with pytest.raises(errors.KestrelProtocolError):
        protocol.parse_value_header(b"VALUE q 0 x")
    with pytest.raises(errors.KestrelProtocolError):
        protocol.parse_value_header(b"STORED")


def test_parse_stats_server_and_queues_with_underscores():
    lines = ["STAT uptime 12", "STAT version 2.4.1", "STAT load 0.5",
             "STAT queue_a_items 3", "STAT queue_a_total_items 9", "STAT queue_a_bytes 30",
             "STAT queue_a_total_items_items 1", "STAT queue_a_total_items_bytes 4",
             "STAT queue_a_total_items_total_items 2",
             "STAT queue_my_q_open_transactions 1", "STAT queue_my_q_items 0",
             "STAT queue_weird 5", "garbage"]
    assert protocol.parse_stats(lines) == {
        "server": {"uptime": 12, "version": "2.4.1", "load": 0.5, "queue_weird": 5},
        "queues": {"a": {"items": 3, "total_items": 9, "bytes": 30},
                   "a_total_items": {"items": 1, "bytes": 4, "total_items": 2},
                   "my_q": {"open_transactions": 1, "items": 0}}}


# ---- server choice and back-off --------------------------------------------------------------

def addresses(n):
    return [("h", 1000 + i) for i in range(n)]


def ports(servers):
    return [s.port for s in servers]


def test_a_server_is_named_as_its_address_is_written():
    """Errors, stats and metrics name a server by `address`: parse_servers must read it
    back as the same server (an IPv6 host without brackets is refused there)."""
    for text in ("kestrel-1:22133", "127.0.0.1:7", "[::1]:7", "[2001:db8::5]:22133"):
        (server,) = ServerSet(protocol.parse_servers(text), retry_ms=0).servers
        assert server.address == text
        assert protocol.parse_servers(server.address) == [(server.host, server.port)]


def test_order_rotates_over_all_servers():
    cluster = ServerSet(addresses(3), retry_ms=1000, clock=Clock(), start=1)
    assert ports(cluster.order()) == [1001, 1002, 1000]
    assert ports(cluster.order()) == [1002, 1000, 1001]
    assert ports(cluster.order()) == [1000, 1001, 1002]
    assert ports(cluster.order()) == [1001, 1002, 1000]


def test_failed_server_is_skipped_for_retry_ms_then_retried():
    clock = Clock()
    cluster = ServerSet(addresses(2), retry_ms=1000, clock=clock, start=0)
    down = cluster.servers[0]
    cluster.mark_down(down)
    assert ports(cluster.order()) == [1001]
    clock.now += 0.999
    assert ports(cluster.order()) == [1001]
    clock.now += 0.002
    assert 1000 in ports(cluster.order())
    # failing again pushes it out for another retry_ms from now
    cluster.mark_down(down)
    assert ports(cluster.order()) == [1001]
    assert down.failures == 2
    cluster.mark_up(down)
    assert down.failures == 0 and cluster.healthy(down)


def test_all_down_gives_empty_order():
    cluster = ServerSet(addresses(2), retry_ms=500, clock=Clock(), start=0)
    for s in cluster.servers:
        cluster.mark_down(s)
    assert cluster.order() == []


class ClosedProbe:
    def __init__(self):
        self.closed = False

    def close(self):
        self.closed = True


def test_mark_down_closes_idle_connections():
    cluster = ServerSet(addresses(1), clock=Clock(), start=0)
    probes = [ClosedProbe(), ClosedProbe()]
    cluster.servers[0].idle.extend(probes)
    cluster.mark_down(cluster.servers[0])
    assert [p.closed for p in probes] == [True, True] and not cluster.servers[0].idle


# ---- write failover bookkeeping (server I/O replaced by a script) ----------------------------

class ScriptedClient(kc.Client):
    """_put_on replaced: each server either stores all, refuses some, or fails after k."""

    def __init__(self, behaviour, clock):
        super().__init__(["h:1", "h:2", "h:3"], retry_ms=1000, clock=clock)
        self.cluster._next = 0
        self.behaviour = behaviour
        self.sent = []
        self.bufs = []

    def _put_on(self, server, pairs, buf):
        assert buf == protocol.build_sets(pairs)
        self.sent.append((server.port, list(pairs)))
        self.bufs.append(buf)
        kind, k = self.behaviour[server.port]
        if kind == "ok":
            return ()
        if kind == "not_stored":  # refuses the item at index k, stores the rest
            return [pairs[k]] if k < len(pairs) else ()
        left = list(pairs[k:])  # the first k were STORED
        if kind == "dies":
            raise errors.KestrelConnectionError("boom", remaining=left)
        raise errors.KestrelServerError("SERVER_ERROR read-only", remaining=left)


def items(n):
    return [("q", b"i%d" % i) for i in range(n)]


def test_put_many_resends_only_unconfirmed_items_to_next_server():
    clock = Clock()
    c = ScriptedClient({1: ("dies", 2), 2: ("server_error", 1), 3: ("ok", 0)}, clock)
    batch = items(5)
    assert c.put_many(batch) is None
    assert c.sent == [(1, batch), (2, batch[2:]), (3, batch[3:])]
    # both failed servers now back off; the next batch goes straight to port 3
    c.sent.clear()
    assert c.put_many(items(1)) is None
    assert c.sent == [(3, items(1))]
    clock.now += 1.001
    c.behaviour[1] = ("ok", 0)
    c.cluster._next = 0
    c.sent.clear()
    assert c.put_many(items(1)) is None
    assert c.sent == [(1, items(1))]


def test_not_stored_moves_item_on_without_marking_server_down():
    c = ScriptedClient({1: ("not_stored", 1), 2: ("ok", 0), 3: ("ok", 0)}, Clock())
    batch = items(3)
    assert c.put_many(batch) is None
    assert c.sent == [(1, batch), (2, [batch[1]])]
    assert all(c.cluster.healthy(s) for s in c.cluster.servers)


def test_put_many_raises_with_remaining_when_no_server_takes_them():
    c = ScriptedClient({1: ("dies", 1), 2: ("dies", 0), 3: ("not_stored", 0)}, Clock())
    batch = items(3)
    with pytest.raises(errors.KestrelUnavailable) as e:
        c.put_many(batch)
    assert e.value.remaining == [batch[1]]
    assert isinstance(e.value, errors.KestrelError)
    # servers 1 and 2 back off, 3 answered NOT_STORED and stays healthy
    assert ports(c.cluster.order()) == [3]
    assert c.add_many("q", [b"a"]) is False
    assert c.add("q", "a") is False


def test_put_many_validates_names_before_sending():
    c = ScriptedClient({1: ("ok", 0), 2: ("ok", 0), 3: ("ok", 0)}, Clock())
    with pytest.raises(errors.InvalidQueueName):
        c.put_many([("q", b"1"), ("no/slash", b"2")])
    assert c.sent == []
    assert c.put_many([]) is None and c.sent == []


def test_add_many_encodes_str_as_utf8():
    c = ScriptedClient({1: ("ok", 0), 2: ("ok", 0), 3: ("ok", 0)}, Clock())
    assert c.add_many("q", ["é", b"\x00"]) is True
    assert c.bufs == [b"set q 0 0 2\r\n\xc3\xa9\r\nset q 0 0 1\r\n\x00\r\n"]


# ---- tools: output lines and stats summary ----------------------------------------------------

@pytest.mark.parametrize("data, line", [
    (b'{"event":"e","properties":{"a":1}}', '{"event":"e","properties":{"a":1}}'),
    (b'{"a": 1}', '{"a": 1}'),
    (b'{\n "a": [1,\n 2]\n}', '{"a":[1,2]}'),
    (b"plain text", '"plain text"'),
    (b"\xff\xfeok", '"\ufffd\ufffdok"'),
    (b"", '""'),
    (b"NaN", '"NaN"'),
    (b'"s\xc3\xa9"', '"s\xe9"'),
])
def test_item_line(data, line):
    assert consume.item_line(data) == line
    assert "\n" not in line


def test_summarise_rates_and_down_servers():
    first = (10.0, {"a:1": {"server": {"total_items": 100, "version": "x"},
                            "queues": {"q": {"items": 5, "total_items": 100, "bytes": 50,
                                             "open_transactions": 0}}},
                    "b:2": None, "c:3": None})
    second = (12.0, {"a:1": {"server": {"total_items": 160, "version": "x"},
                             "queues": {"q": {"items": 7, "total_items": 150, "bytes": 70,
                                              "open_transactions": 1},
                                        "new": {"items": 10, "total_items": 10}}},
                     "b:2": None,
                     "c:3": {"server": {"total_items": 5}, "queues": {}}})
    s = stats.summarise(first, second)
    assert s["b:2"] is None
    assert s["a:1"]["rate"] == 30.0 and s["a:1"]["total_items"] == 160
    assert s["a:1"]["queues"]["q"] == {"items": 7, "total_items": 150, "bytes": 70,
                                       "open_transactions": 1, "rate": 25.0}
    assert s["a:1"]["queues"]["new"]["rate"] == 5.0
    assert s["c:3"]["rate"] is None  # down at the first sample: no rate yet
    table = stats.format_table(s)
    lines = table.splitlines()
    assert lines[0].split() == ["server", "queue", "items", "total_items", "open", "bytes",
                                "items/s"]
    assert lines[1].split() == ["a:1", "(all)", "17", "160", "30.0"]
    assert lines[2].split() == ["new", "10", "10", "-", "-", "5.0"]
    assert lines[3].split() == ["q", "7", "150", "1", "70", "25.0"]
    assert lines[4].split() == ["b:2", "DOWN", "-", "-", "-", "-", "-"]
    assert lines[5].split() == ["c:3", "(all)", "0", "5", "-"]
    assert lines[6] == "3 servers: 2 answer, 1 DOWN (b:2); 17 items queued on those that answer"
    assert lines[7] == "DOWN b:2: no answer"
    assert stats.overview(s) == {"servers": 3, "answering": 2, "down": ["b:2"], "items": 17}
    assert stats.exit_code(s) == 3


def test_stats_summary_line_and_exit_code_for_all_and_none():
    up = {"up": True, "items": 4, "total_items": 9, "rate": 1.0, "queues": {}}
    assert stats.summary_line({"a:1": up, "b:2": up}) == "2 servers: all answer; 8 items queued"
    assert stats.exit_code({"a:1": up, "b:2": up}) == 0
    assert stats.summary_line({"a:1": None, "b:2": None}) == "2 servers: none answers"
    assert stats.exit_code({"a:1": None, "b:2": None}) == 1
    table = stats.format_table({"a:1": None}, {"a:1": "a:1: connect: timed out"})
    assert table.splitlines()[-1] == "DOWN a:1: connect: timed out"


# ---- read rounds (server I/O replaced by a script) ------------------------------------------

class ScriptedReads(kc.Client):
    """_read_one replaced: each server answers from a script; the clock advances by the
    `/t=` wait asked for, as a blocking get on an empty queue would."""

    def __init__(self, answers, retry_ms=0):
        self.clock_ = Clock()
        super().__init__(["h:1", "h:2"], retry_ms=retry_ms, clock=self.clock_)
        self.cluster._next = 0
        self.answers = answers
        self.calls = []

    def _read_one(self, server, queue, wait, options, key):
        self.calls.append((server.port, wait))
        answer = self.answers[server.port]
        if answer is kc.FAILED:
            self.cluster.mark_down(server)
            return answer
        if answer is None:
            self.clock_.now += wait / 1000.0
        return answer


def test_read_spreads_the_wait_over_servers_in_slices():
    c = ScriptedReads({1: None, 2: None})
    assert c.get("q", timeout=1200) is None
    # one quick round, then blocking slices of at most 500 ms each
    assert c.calls == [(1, 0), (2, 0), (1, 500), (2, 500), (1, 100), (2, 100)]


def test_single_server_read_is_one_blocking_wait():
    c = ScriptedReads({1: None})
    c.cluster = ServerSet([("h", 1)], clock=c.clock_, start=0)
    assert c.get("q", timeout=3000) is None
    assert c.calls == [(1, 3000)]


def test_failed_server_is_not_asked_again_in_the_same_read_even_with_retry_0():
    c = ScriptedReads({1: kc.FAILED, 2: None}, retry_ms=0)
    assert c.next("q", timeout=1000) is None
    assert [p for p, _ in c.calls] == [1, 2, 2, 2]
    c.answers[2] = kc.FAILED
    c.calls.clear()
    with pytest.raises(errors.KestrelUnavailable):
        c.peek("q", timeout=1000)
    assert c.calls == [(2, 0), (1, 0)]


def test_read_returns_first_item_found():
    c = ScriptedReads({1: None, 2: b"item"})
    assert c.get("q", timeout=1000) == b"item"
    assert c.calls == [(1, 0), (2, 0)]


def test_unstored_hands_back_the_callers_own_pair_objects():
    """The HTTP worker maps KestrelUnavailable.remaining back to requests by identity."""
    from ingest.kestrel.client import unstored
    pairs = [("q", b"x"), ("q", b"x"), ("q", b"y")]
    left = unstored(pairs, [1])
    assert left == [pairs[0], pairs[2]] and left[0] is pairs[0] and left[1] is pairs[2]
    assert all(a is b for a, b in zip(unstored(pairs, []), pairs))
