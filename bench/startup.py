"""
Start-up: how long dache takes to load N entries (100 B values) from each
durable engine, and the resident memory they cost.

For each engine: fill an empty store with bench.fill, start `twistd dache` on
it (pinned like every server) and time it to its "listening" line; read the
engine's own "loaded N entries in S s" line; read VmRSS. For the disk engine,
then compact the log (bench.fill --compact) and time a start on it again: a
node's log is its writes until its first compaction, compacted after. The same engine on an
empty store gives the baseline RSS, so

    bytes per entry = (RSS full - RSS empty) / N
    overhead        = bytes per entry - (key bytes + value bytes)

Also the environments of the durable engines used by the load scenarios, and
the throwaway PostgreSQL cluster they share.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from bench.fill import VALUE_BYTES, key_of
from bench.servers import SERVER_CPU, dache, pinned
from dache.engines import REGISTRY

LOADED = re.compile(r"loaded (\d+) entries in ([\d.]+)s")

_cluster: Any = None  # the throwaway PostgreSQL cluster, once started


@dataclass
class Startup:
    engine: str
    entries: int
    fill_seconds: float | None = None
    load_seconds: float | None = None  # dache's own "loaded ... in" figure
    listening_seconds: float | None = None  # process start to listening
    # The same, started again after the engine compacted its store (disk only).
    compacted_load_seconds: float | None = None
    compacted_listening_seconds: float | None = None
    rss_empty: int | None = None
    rss_full: int | None = None
    error: str | None = None

    @property
    def bytes_per_entry(self) -> float | None:
        if self.rss_full is None or self.rss_empty is None:
            return None
        return (self.rss_full - self.rss_empty) / self.entries

    @property
    def overhead_per_entry(self) -> float | None:
        per_entry = self.bytes_per_entry
        if per_entry is None:
            return None
        return per_entry - (len(key_of(0)) + VALUE_BYTES)


# -- engine environments


def disk_env(workdir: str) -> dict[str, str]:
    path = tempfile.mkdtemp(prefix="disk-", dir=workdir)
    return {"DURABILITY_ENGINE": "disk", "DISK_PATH": path, "DISK_FSYNC": "always"}


def prepare(workdir: str) -> None:
    """Start what the durable engines need (a PostgreSQL cluster), if they exist."""
    global _cluster
    if "postgres" in REGISTRY and _cluster is None:
        from bench.postgres import start_cluster

        _cluster = start_cluster(workdir)


def postgres_env(workdir: str) -> dict[str, str]:
    """A new, empty database on the cluster prepare() started."""
    from bench.postgres import database_env

    assert _cluster is not None, "prepare() starts the cluster first"
    return database_env(_cluster)


def cluster_pids() -> list[int]:
    """The running cluster's postmaster, if prepare() started one."""
    from bench.postgres import postmaster_pid

    pid = postmaster_pid(_cluster) if _cluster is not None else None
    return [pid] if pid else []


def cleanup() -> None:
    global _cluster
    if _cluster is not None:
        from bench.postgres import stop_cluster

        stop_cluster(_cluster)
        _cluster = None


# -- measurement


def durable_engines() -> list[str]:
    return [name for name in ("disk", "postgres") if name in REGISTRY]


def engine_envs(engine: str, workdir: str) -> tuple[dict[str, str], dict[str, str]]:
    """Two environments of `engine` on separate, empty stores: (empty, full)."""
    if engine == "disk":
        return disk_env(workdir), disk_env(workdir)
    return postgres_env(workdir), postgres_env(workdir)


def measure(engine: str, workdir: str, entries: int) -> Startup:
    result = Startup(engine, entries)
    empty_env, full_env = engine_envs(engine, workdir)
    began = time.monotonic()
    filled = subprocess.run(
        pinned(SERVER_CPU, [sys.executable, "-m", "bench.fill", str(entries)]),
        env={**os.environ, **full_env},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if filled.returncode != 0:
        result.error = f"fill failed: {(filled.stdout + filled.stderr).strip()[-500:]}"
        return result
    result.fill_seconds = time.monotonic() - began

    empty = dache(f"startup-{engine}-empty", empty_env).start()
    try:
        result.rss_empty = settled_rss(empty)
    finally:
        empty.stop()

    server = dache(f"startup-{engine}", full_env)
    began = time.monotonic()
    server.start(timeout=300)
    try:
        result.listening_seconds = time.monotonic() - began
        result.rss_full = settled_rss(server)
        result.load_seconds = loaded_seconds(server, entries, result)
    finally:
        server.stop()
    if engine == "disk" and result.error is None:
        measure_compacted(full_env, entries, result)
    return result


def loaded_seconds(server: Any, entries: int, result: Startup) -> float | None:
    """The server's own "loaded N entries in S s" figure (an error noted if N is wrong)."""
    for line in server.lines:
        match = LOADED.search(line)
        if match:
            if int(match.group(1)) != entries:
                result.error = f"loaded {match.group(1)} entries, expected {entries}"
            return float(match.group(2))
    return None


def measure_compacted(env: dict[str, str], entries: int, result: Startup) -> None:
    """Compact the filled store, then time a start on the compacted log."""
    compacted = subprocess.run(
        pinned(SERVER_CPU, [sys.executable, "-m", "bench.fill", "--compact"]),
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if compacted.returncode != 0:
        result.error = f"compaction failed: {(compacted.stdout + compacted.stderr).strip()[-500:]}"
        return
    server = dache("startup-disk-compacted", env)
    began = time.monotonic()
    server.start(timeout=300)
    try:
        result.compacted_listening_seconds = time.monotonic() - began
        result.compacted_load_seconds = loaded_seconds(server, entries, result)
    finally:
        server.stop()


def settled_rss(server: Any) -> int:
    """RSS once the freshly started server has settled (a short, bounded wait)."""
    time.sleep(0.5)
    return server.rss_bytes()


def measure_all(workdir: str, entries: int) -> list[Startup]:
    results = []
    for engine in durable_engines():
        sys.stdout.write(f"[bench] start-up: {engine}, {entries} entries\n")
        sys.stdout.flush()
        try:
            results.append(measure(engine, workdir, entries))
        except Exception as e:  # report it, keep the rest of the results
            results.append(Startup(engine, entries, error=str(e)[-500:]))
    return results
