"""
Load from wrk: one thread pinned to the load core, replaying a file of
requests (bench/wrk/requests.lua), bounded by duration and a socket timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
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


def wrk_path() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise RuntimeError("wrk is not installed; run `sh bench/ensure-tools.sh`")
    return path


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads, so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def run_wrk(
    url: str, requests_file: str, connections: int, seconds: int, server_pid: int | None = None
) -> Sample:
    """One wrk run; with server_pid, also the server's CPU time per request."""
    command = pinned(
        LOAD_CPU,
        [
            wrk_path(),
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "--timeout=5s",
            "-s",
            LUA,
            url,
            "--",
            requests_file,
        ],
    )
    cpu_before = cpu_seconds(server_pid) if server_pid else None
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=seconds + 30, check=False
    )
    cpu = cpu_seconds(server_pid) - cpu_before if server_pid and cpu_before is not None else None
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
        cpu_us=cpu * 1e6 / result["requests"] if cpu is not None and result["requests"] else None,
    )
