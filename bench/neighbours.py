"""
How much of the machine other work took while the bench ran: the machine's
busy CPU time (/proc/stat) less the bench's own (this process and every
process below it, exited ones included through their parents' cutime, and the
PostgreSQL cluster it started). The load average cannot tell: the bench's own
servers and wrk keep both cores busy, so it is high after any run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable

from bench.load import descendants, proc_stat

# Others' share of the machine's CPU time at or above which a run is "loaded"
LOADED_SHARE = 0.10


def machine_busy_seconds() -> float:
    """Busy CPU time of every core so far; steal (another VM's) counts as busy."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (
            int(x) for x in f.readline().split()[1:9]
        )
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def tree_seconds(roots: Iterable[int]) -> float:
    """CPU time of the processes below roots, with what their reaped children used."""
    ticks, seen = 0, set()
    for root in roots:
        for pid in descendants(root):
            if pid in seen:
                continue
            seen.add(pid)
            try:
                fields = proc_stat(pid)
            except OSError:
                continue  # gone meanwhile
            ticks += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


class Meter:
    """Others' share of the machine's CPU time from start() to share()."""

    def __init__(self, roots: Callable[[], list[int]]):
        self.roots = roots  # the bench's process trees, asked at each reading
        self._start: tuple[float, float, float] | None = None

    def _reading(self) -> tuple[float, float, float]:
        return time.monotonic(), machine_busy_seconds(), tree_seconds(self.roots())

    def start(self) -> None:
        self._start = self._reading()

    def share(self) -> float | None:
        if self._start is None:
            return None
        (wall0, busy0, ours0), (wall1, busy1, ours1) = self._start, self._reading()
        capacity = (wall1 - wall0) * (os.cpu_count() or 1)
        if capacity <= 0:
            return None
        return min(1.0, max(0.0, ((busy1 - busy0) - (ours1 - ours0)) / capacity))
