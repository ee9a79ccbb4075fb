"""
A real PostgreSQL for the test suite (a pytest plugin, loaded by conftest.py).

By default the suite starts its own throwaway cluster, once per session:
initdb into a temporary directory, a free port, a Unix socket in that
directory, run as the `postgres` user when the tests run as root; about a
second. With DACHE_TEST_POSTGRES_DSN set (a libpq connection string for a role
that may CREATE DATABASE), the suite uses that server instead, except for the
tests that must stop and start PostgreSQL: those always get a cluster of their
own. Nothing is ever skipped: no PostgreSQL, no passing tests.

Fixtures:
    postgres          the session's PostgresServer
    own_postgres      a PostgresServer this process controls (stop()/start())
    pg                a fresh, empty database on `postgres`, for one test
    own_pg            a fresh, empty database on `own_postgres`, for one test
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import psycopg2
import pytest

DSN_VARIABLE = "DACHE_TEST_POSTGRES_DSN"
ROLE = "postgres"  # the cluster's superuser
TEST_PASSWORD_ROLE = "dache_pw"  # a role that must log in with a password over TCP


def find_bindir() -> str:
    """The PostgreSQL server binaries' directory (scripts/ensure-postgres.sh installs them)."""
    candidates = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        candidates.append(out.stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for directory in candidates:
        if directory and os.access(os.path.join(directory, "initdb"), os.X_OK):
            return directory
    raise RuntimeError(
        "PostgreSQL server binaries (initdb) not found: run `make test`, which installs "
        f"them, or set {DSN_VARIABLE} to a server the tests may create databases on"
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Database:
    """One database: how dache reaches it (env), and a synchronous SQL helper for asserts."""

    def __init__(self, server: PostgresServer, name: str):
        self.server = server
        self.name = name

    @property
    def env(self) -> dict[str, str]:
        """Settings for a dache subprocess (or Config) using this database."""
        return {
            "DURABILITY_ENGINE": "postgres",
            "POSTGRES_HOST": self.server.host,
            "POSTGRES_PORT": str(self.server.port),
            "POSTGRES_DATABASE": self.name,
            "POSTGRES_USER": self.server.user,
            **({"POSTGRES_PASSWORD": self.server.password} if self.server.password else {}),
        }

    def config(self, **overrides: Any) -> Any:
        from dache.config import resolve

        return resolve({}, {**self.env, **{k.upper(): str(v) for k, v in overrides.items()}})

    def connect(self) -> Any:
        connection = psycopg2.connect(**self.server.conninfo(self.name))
        connection.autocommit = True
        return connection

    def sql(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        """Run one statement; its rows (or [] for statements without any)."""
        connection = self.connect()
        try:
            with connection.cursor() as cursor:
                cursor.execute(query, params)
                return cursor.fetchall() if cursor.description else []
        finally:
            connection.close()

    def rows(self, table: str = "dache") -> dict[str, tuple[str, float | None]]:
        """key -> (value JSON text, expiry unix seconds or None), straight from the table."""
        result = self.sql(
            f"SELECT key, value, extract(epoch FROM expiry)::float8 FROM {table}"  # noqa: S608
        )
        return {key: (value, expiry) for key, value, expiry in result}


def admin_sql(conninfo: dict[str, Any], query: str) -> None:
    """One statement outside a transaction (CREATE/DROP DATABASE cannot run in one)."""
    connection = psycopg2.connect(**conninfo)
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(query)
    finally:
        connection.close()


def new_database(server: Any, prefix: str) -> Database:
    """A new, uniquely named database on `server` (a PostgresServer or the like)."""
    name = prefix + uuid.uuid4().hex[:12]
    admin_sql(server.conninfo(), f'CREATE DATABASE "{name}"')
    return Database(server, name)


class PostgresServer:
    """A PostgreSQL server: one we run (initdb + pg_ctl), or one given by a DSN."""

    def __init__(
        self,
        host: str,
        port: int,
        user: str,
        password: str | None = None,
        admin_database: str = "postgres",
        directory: str | None = None,
        bindir: str | None = None,
        fsync: bool = False,
    ):
        self.host = host
        self.port = port
        self.user = user
        self.password = password
        self.admin_database = admin_database
        self.directory = directory  # set when we own the cluster
        self.bindir = bindir
        self.fsync = fsync

    # -- a cluster of our own

    @classmethod
    def initdb(cls, fsync: bool = False) -> PostgresServer:
        """A new cluster, started. fsync=True for benchmarks (durable commits cost an fsync)."""
        bindir = find_bindir()
        directory = tempfile.mkdtemp(prefix="dache-pg-")
        server = cls(directory, free_port(), ROLE, directory=directory, bindir=bindir, fsync=fsync)
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            entry = pwd.getpwnam("postgres")
            os.chown(directory, entry.pw_uid, entry.pw_gid)
        server._run(
            "initdb",
            "-D",
            server.data,
            "-U",
            ROLE,
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )
        server.start()
        return server

    @property
    def owned(self) -> bool:
        return self.directory is not None

    @property
    def data(self) -> str:
        assert self.directory is not None
        return os.path.join(self.directory, "data")

    def _run(self, program: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = [os.path.join(self.bindir or "", program), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise RuntimeError(f"{program} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def start(self) -> None:
        """Start the cluster and wait until it accepts connections."""
        # fsync=off: these clusters only survive process crashes (stop -m immediate
        # leaves every committed write in the OS page cache), never a power cut.
        options = (
            f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1"
            " -c max_connections=200"
        )
        if not self.fsync:
            options += " -c fsync=off -c full_page_writes=off"
        self._run(
            "pg_ctl",
            "-D",
            self.data,
            "-l",
            os.path.join(self.directory or "", "server.log"),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )

    def stop(self, mode: str = "immediate") -> None:
        """Stop the cluster; `immediate` is a crash of PostgreSQL (no shutdown checkpoint)."""
        self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "stop")

    def running(self) -> bool:
        return self._run("pg_ctl", "-D", self.data, "status", check=False).returncode == 0

    def destroy(self) -> None:
        if self.running():
            self.stop()
        shutil.rmtree(self.directory or "", ignore_errors=True)

    # -- a server given by DACHE_TEST_POSTGRES_DSN

    @classmethod
    def from_dsn(cls, dsn: str) -> PostgresServer:
        parts = psycopg2.extensions.parse_dsn(dsn)
        return cls(
            host=parts.get("host", "localhost"),
            port=int(parts.get("port", 5432)),
            user=parts.get("user", os.environ.get("USER", "postgres")),
            password=parts.get("password"),
            admin_database=parts.get("dbname", "postgres"),
        )

    # -- databases

    def conninfo(self, database: str | None = None) -> dict[str, Any]:
        info: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "dbname": database or self.admin_database,
        }
        if self.password:
            info["password"] = self.password
        return info

    def admin_sql(self, query: str) -> None:
        admin_sql(self.conninfo(), query)

    def create_database(self) -> Database:
        return new_database(self, "dache_test_")

    def drop_database(self, database: Database) -> None:
        if self.owned and not self.running():
            return  # the whole cluster goes at the end of the session
        self.admin_sql(f'DROP DATABASE IF EXISTS "{database.name}" WITH (FORCE)')

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg2.connect(**self.conninfo(), connect_timeout=2).close()
                return
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def _env_dsn(environ: Mapping[str, str] = os.environ) -> str | None:
    return environ.get(DSN_VARIABLE) or None


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    dsn = _env_dsn()
    if dsn:
        server = PostgresServer.from_dsn(dsn)
        server.wait_ready()
        yield server
        return
    server = PostgresServer.initdb()
    yield server
    server.destroy()


@pytest.fixture(scope="session")
def own_postgres(postgres: PostgresServer) -> Iterator[PostgresServer]:
    """A cluster the tests may stop and start (the session's own one, when it has one)."""
    if postgres.owned:
        yield postgres
        return
    server = PostgresServer.initdb()
    yield server
    server.destroy()


def _database(server: PostgresServer) -> Iterator[Database]:
    database = server.create_database()
    yield database
    if server.owned and not server.running():
        server.start()  # a test stopped it and failed before starting it again
    server.drop_database(database)


@pytest.fixture
def pg(postgres: PostgresServer) -> Iterator[Database]:
    yield from _database(postgres)


@pytest.fixture
def own_pg(own_postgres: PostgresServer) -> Iterator[Database]:
    yield from _database(own_postgres)


@pytest.fixture
def pg_engine():
    """
    pg_engine(database, **settings) -> a PostgresEngine on the real reactor
    (settings as Config attributes, e.g. postgres_table="t"); all closed at teardown.
    """
    from twisted.internet import reactor

    from dache.engines.postgres import PostgresEngine, settings_from_config

    made = []

    def make(database: Database, **settings: Any) -> PostgresEngine:
        engine = PostgresEngine(settings_from_config(database.config(**settings)), reactor)
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close()


@pytest.fixture
def logged_errors():
    """Every error-level Twisted log event (e.g. "Unhandled Error") during the test, as text."""
    from twisted.logger import LogLevel, formatEventAsClassicLogText, globalLogPublisher

    errors: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level") in (LogLevel.error, LogLevel.critical) or event.get("isError"):
            errors.append(formatEventAsClassicLogText(event) or repr(event))

    globalLogPublisher.addObserver(observe)
    yield errors
    globalLogPublisher.removeObserver(observe)
