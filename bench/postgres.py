"""
The PostgreSQL the postgres engine's scenarios run on: the test suite's
throwaway cluster (tests/postgres.py), with fsync on (a synchronous commit
costs a real fsync, as in production) and pinned to the server core like
every other server (the cluster inherits the affinity of whoever starts it).
"""

from __future__ import annotations

import os
from typing import Any

from bench.servers import SERVER_CPU


def start_cluster(workdir: str) -> Any:
    from tests.postgres import PostgresServer

    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {SERVER_CPU})
    try:
        return PostgresServer.initdb(fsync=True)
    finally:
        os.sched_setaffinity(0, previous)


def database_env(server: Any) -> dict[str, str]:
    """The environment of a dache on a new, empty database of the cluster."""
    return server.create_database().env


def stop_cluster(server: Any) -> None:
    server.destroy()
