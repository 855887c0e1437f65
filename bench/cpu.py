"""CPU accounting from /proc (Linux): the server under test, the cores, the machine.

The server under test may be one process (`--server-pid`), several (`--server-pid`
repeated: workers behind nginx), or everything a supervisord started (`--server-children
PID`: every descendant, re-listed at the end of the run so that a process restarted
meanwhile is counted from its start).  Processes given as helpers (the queue) are
reported apart and not counted as the server.

This module only reads /proc; it never signals or starts anything.
"""
import os

from testkit.procs import cpu_seconds


def proc_cpu_s(pid):
    """User + system CPU seconds used so far by `pid`, or None if unreadable."""
    try:
        return cpu_seconds(pid)
    except (OSError, IndexError, ValueError):
        return None


def cores_busy():
    """{core: (busy, total, steal) jiffies} from /proc/stat, or {} where unavailable.

    busy includes steal: time the hypervisor gave the core to other machines, which
    this machine's processes could not use either."""
    out = {}
    try:
        with open("/proc/stat") as fh:
            for line in fh:
                core = core_ticks(line)
                if core is not None:
                    out[core[0]] = core[1]
    except OSError:
        pass
    return out


def core_ticks(line):
    """(core, (busy, total, steal)) from a `cpuN ...` line of /proc/stat, else None.
    Its columns: user nice system idle iowait irq softirq steal (guest time, after
    them, is already in user and nice)."""
    name, *values = line.split()
    if not name.startswith("cpu") or name == "cpu":
        return None
    ticks = [int(v) for v in values[:8]] + [0] * (8 - len(values[:8]))   # old kernels
    idle = ticks[3] + ticks[4]  # idle + iowait
    return int(name[3:]), (sum(ticks) - idle, sum(ticks), ticks[7])


def busy_shares(before, after, field=0):
    """Per core, the share of time it was busy (any process, or the hypervisor) between
    two readings of cores_busy; with field=2, the share the hypervisor took (steal)."""
    shares = {}
    for core, reading in after.items():
        total = reading[1]
        if core in before and total > before[core][1]:
            shares[str(core)] = round((reading[field] - before[core][field])
                                      / (total - before[core][1]), 3)
    return shares


def steal_shares(before, after):
    """Per core, the share of time between two readings the hypervisor ran other
    machines on it: a figure measured meanwhile is of a slower machine."""
    return busy_shares(before, after, field=2)


def _parents():
    """{pid: parent pid} of every process."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/%s/stat" % name) as fh:
                    out[int(name)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return out


def descendants(roots):
    """Every process below the pids in `roots` (children, grandchildren, ...)."""
    children = {}
    for pid, ppid in _parents().items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), list(roots)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def process_name(pid):
    """A short name for reports: the command line's first words."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as fh:
            words = fh.read().split(b"\0")
    except OSError:
        return "?"
    words = [w.decode("utf-8", "replace") for w in words if w]
    words = [os.path.basename(words[0])] + words[1:] if words else []
    return " ".join(words[:4])[:60]


class ServerProcesses:
    """The processes of the server under test: `pids`, and the descendants of
    `parents`, minus `exclude` (the helpers)."""

    def __init__(self, pids=(), parents=(), exclude=()):
        self.pids, self.parents, self.exclude = list(pids), list(parents), set(exclude)

    def __bool__(self):
        return bool(self.pids or self.parents)

    def snapshot(self):
        """{pid: (CPU seconds, name)} of every process of the group now."""
        pids = set(self.pids) | (descendants(self.parents) if self.parents else set())
        out = {}
        for pid in sorted(pids - self.exclude):
            cpu = proc_cpu_s(pid)
            if cpu is not None:
                out[pid] = (cpu, process_name(pid))
        return out


def group_usage(before, after, elapsed_s):
    """CPU of the group between two snapshots: total core share, each process's share,
    and how many processes exited meanwhile (their last CPU is not counted)."""
    procs = []
    for pid, (cpu, name) in after.items():
        start = before[pid][0] if pid in before else 0.0   # started during the run
        procs.append({"pid": pid, "name": name, "new": pid not in before,
                      "core_share": round((cpu - start) / elapsed_s, 3)})
    procs.sort(key=lambda p: -p["core_share"])
    return {"core_share": round(sum(p["core_share"] for p in procs), 3), "processes": procs,
            "exited": sorted(set(before) - set(after))}
