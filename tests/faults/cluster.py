"""
The system under test for fault runs: dache nodes as `twistd -n dache`
subprocesses on fixed loopback ports (so clients keep their node across a
kill and restart), either several postgres-engine nodes sharing one table,
each reaching PostgreSQL through a FaultProxy of its own, or one disk-engine
node.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import tempfile
import time
from typing import Any
from urllib.parse import quote

from tests.faultproxy import FaultProxy
from tests.postgres import Database, PostgresServer, free_port
from tests.process import DacheProcess

ROLE = "dache_faults"  # a prefix: each cluster gets a role of its own
# Short timeouts so faults show within a run: writes give up after WRITE_TIMEOUT.
NODE_SETTINGS = {
    "WRITE_TIMEOUT": "2",
    "HEALTH_TIMEOUT": "1",
    "POSTGRES_CONNECT_TIMEOUT": "60",
    "METRICS": "false",
}


class Node:
    def __init__(self, name: str, env: dict[str, str], proxy: FaultProxy | None = None):
        self.name = name
        self.port = free_port()
        self.env = {**NODE_SETTINGS, **env}
        self.proxy = proxy
        self.process: DacheProcess | None = None
        self.restarts = 0
        self.logs: list[str] = []  # output of earlier processes, for a failure report

    def start(self, timeout: float = 60.0) -> None:
        self.process = DacheProcess(
            env=self.env, args=(f"--listen=tcp:{self.port}:interface=127.0.0.1",)
        )
        self.process.own_disk_path = None  # DISK_PATH is the node's, kept across restarts
        self.process.start(timeout=timeout)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.logs += self.process.lines

    def restart(self) -> None:
        self.restarts += 1
        self.start()

    def pause(self) -> None:
        assert self.process is not None and self.process.proc is not None
        self.process.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None and self.process.proc is not None
        self.process.proc.send_signal(signal.SIGCONT)

    def alive(self) -> bool:
        return self.process is not None and self.process.proc.poll() is None

    def output(self) -> str:
        return "\n".join(self.logs + (self.process.lines if self.process else []))

    def stop(self) -> None:
        if self.process is not None:
            self.resume() if self.alive() else None
            self.process.stop()


class Cluster:
    """Nodes, their proxies and (for the postgres engine) the PostgreSQL they share."""

    def __init__(
        self,
        nodes: list[Node],
        server: PostgresServer | None,
        directory: str,
        database: Database | None = None,
    ):
        self.nodes = nodes
        self.server = server
        self.directory = directory
        self.database = database

    @classmethod
    def postgres(cls, server: PostgresServer, database: Database, count: int = 3) -> Cluster:
        """`count` postgres-engine nodes on `database`, each through a proxy, over TCP."""
        password = secrets.token_hex(12)  # a throwaway role's; never printed
        role = f"{ROLE}_{secrets.token_hex(4)}"
        server.admin_sql(f"CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{password}'")
        nodes = []
        for i in range(count):
            proxy = FaultProxy("127.0.0.1", server.port)
            env = {
                "DURABILITY_ENGINE": "postgres",
                "POSTGRES_HOST": "127.0.0.1",
                "POSTGRES_PORT": str(proxy.port),
                "POSTGRES_DATABASE": database.name,
                "POSTGRES_USER": role,
                "POSTGRES_PASSWORD": password,
                "POSTGRES_SSLMODE": "disable",
                "POSTGRES_PURGE_INTERVAL": "1",
            }
            nodes.append(Node(f"n{i + 1}", env, proxy))
        return cls(nodes, server, tempfile.mkdtemp(prefix="dache-faults-"), database)

    @classmethod
    def failover(cls, server: Any, database: Database, count: int = 3) -> Cluster:
        """
        `count` postgres-engine nodes on a primary and its standby
        (tests.faults.failover.HAPostgres), given both hosts: no proxies.
        """
        env = {
            "DURABILITY_ENGINE": "postgres",
            "POSTGRES_HOST": server.host,
            "POSTGRES_PORT": server.port,
            "POSTGRES_DATABASE": database.name,
            "POSTGRES_USER": server.user,
            "POSTGRES_SSLMODE": "disable",
            "POSTGRES_PURGE_INTERVAL": "1",
        }
        nodes = [Node(f"n{i + 1}", env) for i in range(count)]
        return cls(nodes, server, tempfile.mkdtemp(prefix="dache-faults-"), database)

    @classmethod
    def disk(cls) -> Cluster:
        directory = tempfile.mkdtemp(prefix="dache-faults-")
        disk = os.path.join(directory, "disk")
        node = Node("d1", {"DURABILITY_ENGINE": "disk", "DISK_PATH": disk, "DISK_FSYNC": "always"})
        return cls([node], None, directory)

    def start(self) -> None:
        for node in self.nodes:
            node.start()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
            if node.proxy is not None:
                node.proxy.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def heal(self) -> None:
        """Undo every fault: proxies pass, nodes run, PostgreSQL is up."""
        for node in self.nodes:
            if node.proxy is not None:
                node.proxy.heal()
            if node.alive():
                node.resume()
            else:
                node.restart()
        if self.server is not None and not self.server.running():
            self.server.start()


def read(node: Node, key: str, timeout: float = 5.0) -> tuple[int | None, str | None]:
    """(revision, value) as the node serves the key now; (None, None) when absent."""
    status, headers, body = node.process.request(
        "GET", "/dache/" + quote(key, safe=""), timeout=timeout
    )
    if status == 404:
        return None, None
    if status != 200:
        raise RuntimeError(f"GET {key} on {node.name}: {status} {body[:200]!r}")
    etag = {k.lower(): v for k, v in headers.items()}["etag"]
    return int(etag.strip('"')), json.loads(body)["value"]


def table(database: Database, keys: list[str]) -> dict:
    """(revision, value) per key as the PostgreSQL table holds it; (None, None) when absent."""
    rows = database.sql("SELECT key, revision, value FROM dache WHERE key = ANY(%s)", (keys,))
    held = {key: (revision, json.loads(value)) for key, revision, value in rows}
    return {key: held.get(key, (None, None)) for key in keys}


def converge(cluster: Cluster, keys: list[str], timeout: float = 60.0) -> dict:
    """
    Wait until every node serves the same revision of every key; that state.
    AssertionError naming the keys that still differ when the deadline passes.
    """
    deadline = time.monotonic() + timeout
    while True:
        views = []
        try:
            views = [{key: read(node, key) for key in keys} for node in cluster.nodes]
        except (OSError, RuntimeError):
            pass
        if views and all(view == views[0] for view in views):
            return views[0]
        if time.monotonic() > deadline:
            differing = [k for k in keys if views and len({str(v[k]) for v in views}) > 1]
            raise AssertionError(f"nodes did not converge within {timeout}s on {differing[:10]}")
        time.sleep(0.2)
