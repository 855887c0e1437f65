"""bench's account of the machine: busy and stolen shares of each core, and the report's
warnings about them (no processes: readings are made up)."""
from bench import cpu, report


def test_a_proc_stat_line_reads_as_busy_total_and_steal():
    line = "cpu1 1110225 2396 99120 2222888 9134 0 26690 30181 0 0\n"
    busy = 1110225 + 2396 + 99120 + 0 + 26690 + 30181
    assert cpu.core_ticks(line) == (1, (busy, busy + 2222888 + 9134, 30181))
    assert cpu.core_ticks("cpu  1 2 3 4 5 6 7 8 0 0\n") is None      # all cores summed
    assert cpu.core_ticks("intr 12 0 0\n") is None
    assert cpu.core_ticks("cpu0 5 0 5 10 0\n") == (0, (10, 20, 0))    # no steal column


def test_busy_and_steal_shares_between_two_readings():
    before = {0: (100, 1000, 10), 1: (500, 1000, 0)}
    after = {0: (700, 2000, 110), 1: (600, 2000, 0), 2: (5, 10, 0)}
    assert cpu.busy_shares(before, after) == {"0": 0.6, "1": 0.1}
    assert cpu.steal_shares(before, after) == {"0": 0.1, "1": 0.0}
    assert cpu.busy_shares(after, after) == {}       # no time passed: no share


def _summary(steal):
    return {"loadgen_cpu": {"max_core_share": 0.3, "core_share_per_process": [0.3]},
            "server_cpu_core_share": 0.9, "helpers_cpu_core_share": 0.1,
            "server_processes": [], "server_exited": [], "rate_target": 100.0,
            "order": "random", "rps": 100.0, "requests": 1000, "errors": 0,
            "cores_busy": {"0": 1.0, "1": 0.6}, "cores_steal": steal}


def test_steal_is_reported_and_not_taken_for_other_processes():
    quiet = report._warnings(_summary({"0": 0.0, "1": 0.0}))
    assert any("other processes" in w for w in quiet)       # 0.3 cores unexplained
    assert not any("steal" in w for w in quiet)
    stolen = report._warnings(_summary({"0": 0.1, "1": 0.2}))
    assert any("(steal)" in w and "10%, 20%" in w for w in stolen)
    assert not any("other processes" in w for w in stolen)  # the 0.3 was the hypervisor's
    assert report._other_load(_summary({"0": 0.1, "1": 0.2})) < 0.01
