"""How busy the machine was with other work while a benchmark ran.

The load average cannot say: right after a benchmark it counts the benchmark's own processes. Here
the machine's busy CPU time (from /proc/stat) over the run is set against the CPU time of this
process and its finished children (os.times); the difference is what other processes used. The
hypervisor's steal time, where the guest kernel reports it, is given apart.
"""

from __future__ import annotations

import os
import time

# /proc/stat "cpu" columns: user nice system idle iowait irq softirq steal guest guest_nice
_BUSY = (0, 1, 2, 5, 6)  # guest time is already inside user
_STEAL = 7


def _machine_ticks():
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return sum(fields[i] for i in _BUSY), fields[_STEAL] if len(fields) > _STEAL else 0


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class OtherLoad:
    """Start at construction; `share()` is (CPU used by other processes, steal), each as a fraction of
    the machine's cores over the elapsed wall time, or None where /proc/stat is missing."""

    def __init__(self):
        self.wall, self.own, self.ticks = time.perf_counter(), _own_seconds(), _machine_ticks()

    def share(self):
        now = _machine_ticks()
        if self.ticks is None or now is None:
            return None
        hz = os.sysconf("SC_CLK_TCK")
        capacity = (time.perf_counter() - self.wall) * (os.cpu_count() or 1)
        busy = (now[0] - self.ticks[0]) / hz
        other = max(0.0, busy - (_own_seconds() - self.own))
        return other / capacity, (now[1] - self.ticks[1]) / hz / capacity

    @staticmethod
    def describe(share) -> str:
        """One line for a `share()` result (measured once, so the header and a warning agree)."""
        if share is None:
            return "CPU use of other processes unknown (no /proc/stat)"
        other, steal = share
        return f"other processes used {100 * other:.1f} % of the CPUs during the run (steal {100 * steal:.1f} %)"
