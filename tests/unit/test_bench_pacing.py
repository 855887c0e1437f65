"""wrk_bench's open loop asks for 75 % of capacity through whole-millisecond delays and
a trial that measures the answers' share of each connection's cycle (no processes: the
Lua expression is evaluated here with Python's random numbers, and the trial's result is
made up)."""
import math
import random
import re

import pytest

from bench import wrk_bench


def _delays(script, n, rng):
    """The delays `script`'s delay() would return, `n` of them, with rng for math.random
    (wrk truncates the value to whole milliseconds; it is whole already)."""
    found = re.search(r"return math\.floor\(math\.random\(\) \* ([\d.]+) \+ math\.random\(\)\)",
                      script)
    assert found, script
    return [math.floor(rng.random() * float(found.group(1)) + rng.random()) for _ in range(n)]


def test_whole_millisecond_delays_keep_the_mean_asked_for():
    rng = random.Random(16)
    for mean_ms in (0.8, 3.2, 4.48, 13.7, 30.3):
        script = wrk_bench.paced_script('wrk.method = "POST"\n', mean_ms)
        assert script.startswith('wrk.method = "POST"\n')
        delays = _delays(script, 50_000, rng)
        assert min(delays) == 0 and max(delays) <= math.ceil(2 * mean_ms)
        assert abs(sum(delays) / len(delays) - mean_ms) < 0.01 * mean_ms + 0.01, mean_ms


def _trial(monkeypatch, requests, seconds=3.0, non_2xx=0, socket_errors=""):
    """wrk_bench's run_wrk replaced by one that answers as a trial of `requests` in
    `seconds` would; returns the list of what it was asked to run."""
    asked = []

    def run(port, path, script, duration, connections, workdir):
        asked.append((port, path, script, duration, connections))
        return {"requests": requests, "seconds": seconds, "non_2xx": non_2xx,
                "socket_errors": socket_errors}
    monkeypatch.setattr(wrk_bench, "run_wrk", run)
    return asked


def test_the_delay_is_shortened_by_what_each_cycle_took_beyond_it(monkeypatch):
    # 10,000 req/s over 50 connections: a 5 ms mean delay.  The trial achieved 8,000/s,
    # a 6.25 ms cycle, so 1.25 ms of each cycle was the answer: ask for 3.75 ms.
    asked = _trial(monkeypatch, 24_000)
    assert wrk_bench.delay_for(10_000, 8080, "/track", None, "/tmp") == \
        pytest.approx(3.75)
    (port, path, script, duration, connections), = asked
    assert (port, path, duration, connections) == (8080, "/track", 3, 50)
    assert "math.random() * 10.0000 +" in script            # the trial ran at 5 ms


def test_timers_that_fired_early_lengthen_the_delay_and_none_goes_below_zero(monkeypatch):
    _trial(monkeypatch, 33_000)   # 11,000/s achieved where 10,000 were asked for
    assert wrk_bench.delay_for(10_000, 1, "/", None, "/tmp") == \
        pytest.approx(2 * 5.0 - 50_000 / 11_000.0)
    _trial(monkeypatch, 300)      # answers slower than the pace: no delay at all
    assert wrk_bench.delay_for(10_000, 1, "/", None, "/tmp") == 0.0


@pytest.mark.parametrize("trial", [dict(requests=0), dict(requests=900, non_2xx=3),
                                   dict(requests=900, socket_errors="connect 0, read 2")])
def test_a_trial_that_failed_stops_the_benchmark_with_its_reason(trial, monkeypatch):
    _trial(monkeypatch, **trial)
    with pytest.raises(SystemExit, match="nothing to pace from"):
        wrk_bench.delay_for(10_000, 1, "/", None, "/tmp")
