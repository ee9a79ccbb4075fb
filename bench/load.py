"""
Load from wrk: one thread pinned to the load core, replaying a file of
requests (bench/wrk/requests.lua), bounded by duration and a socket timeout.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from bench.servers import LOAD_CPU, pinned

LUA = os.path.join(os.path.dirname(__file__), "wrk", "requests.lua")


@dataclass
class Sample:
    """One wrk run."""

    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non2xx: int
    errors: int  # socket errors and timeouts
    cpu_us: float | None = None  # server CPU time per request (user + system)
    load_share: float | None = None  # wrk's CPU time over the machine's, when unpinned


def wrk_path() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise RuntimeError("wrk is not installed; run `sh bench/ensure-tools.sh`")
    return path


def proc_stat(pid: int) -> list[str]:
    """/proc/<pid>/stat's fields after the command name (field 3 onwards)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()


def descendants(pid: int) -> list[int]:
    """pid and every live process below it (dache's workers, a forked Redis child)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents.setdefault(int(proc_stat(int(entry))[1]), []).append(int(entry))
            except (OSError, IndexError):
                continue  # gone meanwhile
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(parents.get(current, []))
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its live children, all threads, so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for process in descendants(pid):
        try:
            fields = proc_stat(process)
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / ticks


def _cpu_of(pids: Sequence[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


def run_wrk(
    url: str,
    requests_file: str,
    connections: int,
    seconds: int,
    server_pid: int | Sequence[int] | None = None,
    threads: int = 1,
    cpu: int | None = LOAD_CPU,
) -> Sample:
    """
    One wrk run; with server_pid (one pid or several), also the server's CPU
    time per request. cpu None: wrk is not pinned (the whole-machine runs) and
    its share of the machine's CPU time is measured.
    """
    pids = (server_pid,) if isinstance(server_pid, int) else tuple(server_pid or ())
    command = [
        wrk_path(),
        f"-t{threads}",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout=5s",
        "-s",
        LUA,
        url,
        "--",
        requests_file,
    ]
    if cpu is not None:
        command = pinned(cpu, command)
    cpu_before = _cpu_of(pids) if pids else None
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=seconds + 30, check=False
    )
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_used = _cpu_of(pids) - cpu_before if cpu_before is not None else None
    # wrk is the only child waited for meanwhile, so the children's rusage grew by its own
    wrk_cpu = (children_after.ru_utime + children_after.ru_stime) - (
        children_before.ru_utime + children_before.ru_stime
    )
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
            break
    else:
        raise RuntimeError(f"wrk printed no result:\n{done.stdout}\n{done.stderr}")
    seconds_run = result["duration_us"] / 1e6
    return Sample(
        rps=result["requests"] / seconds_run,
        p50_ms=result["p50_us"] / 1000,
        p99_ms=result["p99_us"] / 1000,
        requests=result["requests"],
        non2xx=result["non2xx"],
        errors=result["socket_errors"] + result["timeouts"],
        cpu_us=cpu_used * 1e6 / result["requests"]
        if cpu_used is not None and result["requests"]
        else None,
        load_share=wrk_cpu / (seconds_run * (os.cpu_count() or 1)) if cpu is None else None,
    )
