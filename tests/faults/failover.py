"""
A PostgreSQL primary with a synchronous streaming standby, promoted by
pg_auto_failover when the primary dies: a monitor and two data nodes, each a
`pg_autoctl run` keeper (with its postgres below it) run as the `postgres`
user in a temporary directory it owns, on free loopback ports.

The monitor's health checks are tuned down (a check every second, a node
unhealthy after 2 s, the old primary's demotion awaited for 2 s) so that a
killed primary is replaced within seconds. With two data nodes
pg_auto_failover keeps the standby synchronous (`synchronous_standby_names`
names it, `synchronous_commit` is on): an acknowledged commit is on both.

dache reaches it as libpq's multi-host `host=a,b port=p1,p2` with
`target_session_attrs=read-write` (the `host`/`port` of this object are those
lists), so a reconnect finds whichever node is the primary.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Any

import psycopg2

from tests.debian import ensure
from tests.postgres import Database, admin_sql, find_bindir, free_port, new_database

PACKAGE = "postgresql-15-auto-failover"
ROLE = "postgres"  # trust on loopback (pg_autoctl --auth trust)
# The monitor's health checks, down from 5 s periods and 20-30 s timeouts.
MONITOR_SETTINGS = {
    "pgautofailover.health_check_period": "1000",
    "pgautofailover.health_check_timeout": "1000",
    "pgautofailover.health_check_max_retries": "1",
    "pgautofailover.health_check_retry_delay": "500",
    "pgautofailover.node_considered_unhealthy_timeout": "2000",
    "pgautofailover.primary_demote_timeout": "2000",
    "pgautofailover.startup_grace_period": "2000",
}


def pg_autoctl() -> str:
    ensure(PACKAGE, lambda: shutil.which("pg_autoctl") is not None)
    return shutil.which("pg_autoctl") or "pg_autoctl"


def process_tree(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as listing:
            children = [int(child) for child in listing.read().split()]
    except FileNotFoundError:
        children = []
    return [pid, *(p for child in children for p in process_tree(child))]


class Keeper:
    """One `pg_autoctl run`: the monitor, or a data node and its postgres."""

    def __init__(self, name: str, directory: str, port: int):
        self.name = name
        self.pgdata = os.path.join(directory, name)
        self.port = port
        self.log = os.path.join(directory, name + ".log")
        self.process: subprocess.Popen[bytes] | None = None

    def run(self, environment: dict[str, str]) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                as_postgres([pg_autoctl(), "run", "--pgdata", self.pgdata]),
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """kill -9 the keeper and everything below it (its postgres and backends)."""
        if self.process is None:
            return
        for pid in process_tree(self.process.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(10)

    def stop(self) -> None:
        if self.alive():
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)  # the keeper stops its postgres
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def as_postgres(command: list[str]) -> list[str]:
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        return ["runuser", "-u", "postgres", "--", *command]
    return command


class HAPostgres:
    """The monitor and two data nodes; `host`, `port` and `conninfo` reach the primary."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="dache-ha-")
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            os.chown(self.directory, entry.pw_uid, entry.pw_gid)
        self.environment = {**os.environ, "PATH": find_bindir() + os.pathsep + os.environ["PATH"]}
        self.monitor = Keeper("monitor", self.directory, free_port())
        self.nodes = [Keeper(f"node{i}", self.directory, free_port()) for i in (1, 2)]
        self.user = ROLE
        self.password = None
        self.host = ",".join("127.0.0.1" for _ in self.nodes)
        self.port = ",".join(str(node.port) for node in self.nodes)
        self.failovers = 0

    # -- the cluster

    @classmethod
    def start_new(cls, timeout: float = 90.0) -> HAPostgres:
        ha = cls()
        try:
            ha._create(timeout)
        except BaseException:
            ha.destroy()
            raise
        return ha

    def _autoctl(self, *args: str) -> None:
        result = subprocess.run(
            as_postgres([pg_autoctl(), *args]),
            env=self.environment,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            raise RuntimeError(f"pg_autoctl {args[0]} failed:\n{result.stdout}\n{result.stderr}")

    def _create(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        common = ["--hostname", "127.0.0.1", "--listen", "127.0.0.1", "--auth", "trust"]
        self._autoctl(
            "create", "monitor", "--pgdata", self.monitor.pgdata,
            "--pgport", str(self.monitor.port), *common, "--no-ssl",
        )  # fmt: skip
        self.monitor.run(self.environment)
        self._wait(lambda: self._monitor_sql("SELECT 1"), deadline, "the monitor to start")
        for name, value in MONITOR_SETTINGS.items():
            self._monitor_sql(f"ALTER SYSTEM SET {name} = '{value}'")
        self._monitor_sql("SELECT pg_reload_conf()")
        monitor = f"postgres://autoctl_node@127.0.0.1:{self.monitor.port}/pg_auto_failover"
        for node in self.nodes:
            self._autoctl(
                "create", "postgres", "--pgdata", node.pgdata, "--pgport", str(node.port),
                "--name", node.name, "--monitor", monitor + "?sslmode=disable", *common, "--no-ssl",
            )  # fmt: skip
            node.run(self.environment)
            self._wait(lambda: self.settled(), deadline, f"{node.name} to join")

    def _monitor_sql(self, query: str) -> list[tuple[Any, ...]]:
        connection = psycopg2.connect(
            host="127.0.0.1",
            port=self.monitor.port,
            user=ROLE,
            dbname="pg_auto_failover",
            connect_timeout=2,
        )
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(query)
                return cursor.fetchall() if cursor.description else []
        finally:
            connection.close()

    def states(self) -> dict[str, tuple[str, str]]:
        """node -> (reported state, goal state), as the monitor has them."""
        rows = self._monitor_sql(
            "SELECT nodename, reportedstate, goalstate FROM pgautofailover.node"
        )
        return {name: (reported, goal) for name, reported, goal in rows}

    def settled(self) -> bool:
        """Every node that joined has reached the state the monitor assigned, one primary."""
        states = self.states()
        if not states or any(reported != goal for reported, goal in states.values()):
            return False
        primaries = [s for s, _ in states.values() if s in ("single", "primary")]
        return len(primaries) == 1 and (len(states) == 1 or "secondary" in dict(states.values()))

    @staticmethod
    def _wait(condition: Any, deadline: float, what: str) -> None:
        while True:
            try:
                if condition() not in (False, None):
                    return
            except psycopg2.Error:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"pg_auto_failover: timed out waiting for {what}")
            time.sleep(0.2)

    def primary(self) -> Keeper | None:
        """The data node that accepts writes now, if any."""
        for node in self.nodes:
            if not node.alive():
                continue
            try:
                connection = psycopg2.connect(
                    host="127.0.0.1",
                    port=node.port,
                    user=ROLE,
                    dbname="postgres",
                    connect_timeout=2,
                )
            except psycopg2.Error:
                continue
            try:
                with connection.cursor() as cursor:
                    cursor.execute("SELECT pg_is_in_recovery()")
                    if not cursor.fetchone()[0]:
                        return node
            finally:
                connection.close()
        return None

    def kill_primary(self, timeout: float = 30.0) -> tuple[Keeper, float]:
        """
        kill -9 the primary (its keeper and its postgres); answers it and the
        seconds until the standby accepted writes.
        """
        old = self.primary()
        assert old is not None, "no primary to kill"
        began = time.monotonic()
        old.kill()
        deadline = began + timeout
        self._wait(lambda: self.primary() not in (None, old), deadline, "a new primary")
        self.failovers += 1
        return old, time.monotonic() - began

    def rejoin(self, node: Keeper, timeout: float = 60.0) -> None:
        """Run a killed node's keeper again: it rejoins as the standby."""
        node.run(self.environment)
        self._wait(lambda: self.settled(), time.monotonic() + timeout, f"{node.name} to rejoin")

    # -- what tests.faults.cluster.Cluster asks of a server

    def running(self) -> bool:
        return all(node.alive() for node in self.nodes)

    def start(self) -> None:
        for node in self.nodes:
            if not node.alive():
                self.rejoin(node)

    def conninfo(self, database: str | None = None) -> dict[str, Any]:
        return {
            "host": self.host,
            "port": self.port,
            "user": ROLE,
            "dbname": database or "postgres",
            "target_session_attrs": "read-write",
            "connect_timeout": 5,
        }

    def admin_sql(self, query: str) -> None:
        admin_sql(self.conninfo(), query)

    def create_database(self) -> Database:
        return new_database(self, "dache_ha_")

    def destroy(self) -> None:
        for keeper in (*self.nodes, self.monitor):
            keeper.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
