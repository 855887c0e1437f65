"""wrk_bench's open loop asks for 75 % of capacity through whole-millisecond delays; they
must keep the mean delay asked for (no processes: the Lua expression is evaluated here
with Python's random numbers)."""
import math
import random
import re

from bench import wrk_bench


def _delays(script, n, rng):
    """The delays `script`'s delay() would return, `n` of them, with rng for math.random."""
    scale = float(re.search(r"math\.random\(\) \* ([\d.]+) \+ math\.random\(\)", script)
                  .group(1))
    return [math.floor(rng.random() * scale + rng.random()) for _ in range(n)]


def test_whole_millisecond_delays_keep_the_mean_asked_for():
    rng = random.Random(16)
    for mean_ms in (0.8, 3.2, 4.48, 13.7, 30.3):
        script = wrk_bench.paced_script('wrk.method = "POST"\n', mean_ms)
        assert script.startswith('wrk.method = "POST"\n')
        delays = _delays(script, 200_000, rng)
        assert all(isinstance(d, int) and 0 <= d <= math.ceil(2 * mean_ms) for d in delays)
        assert abs(sum(delays) / len(delays) - mean_ms) < 0.01 * mean_ms + 0.01, mean_ms
