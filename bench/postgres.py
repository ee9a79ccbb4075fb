"""
The PostgreSQL the postgres engine's scenarios run on: the test suite's
throwaway cluster (tests/postgres.py), with fsync on (a synchronous commit
costs a real fsync, as in production), pinned to the load core beside wrk:
a database is a server of its own, on its own host in production, so it does
not take dache's core (etcd, by contrast, is one process and has core 0 to
itself, as dache does). The cluster inherits the affinity of whoever starts it.
"""

from __future__ import annotations

import os
from typing import Any

from bench.servers import LOAD_CPU


def start_cluster(workdir: str) -> Any:
    from tests.postgres import PostgresServer

    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {LOAD_CPU})
    try:
        return PostgresServer.initdb(fsync=True)
    finally:
        os.sched_setaffinity(0, previous)


def database_env(server: Any) -> dict[str, str]:
    """The environment of a dache on a new, empty database of the cluster."""
    return server.create_database().env


def stop_cluster(server: Any) -> None:
    server.destroy()


def postmaster_pid(server: Any) -> int | None:
    """The cluster's postmaster (pg_ctl daemonizes it, so it is no child of ours)."""
    try:
        with open(os.path.join(server.data, "postmaster.pid")) as f:
            return int(f.readline())
    except (OSError, ValueError):
        return None
