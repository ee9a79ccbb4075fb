"""
The PostgreSQL durability engine: every acknowledged set and delete is a row
change committed in PostgreSQL (through txpostgres) before it is visible.

- write(batch) is one statement, so one transaction: every change gets a
  revision from the table's sequence, in batch order; the last change per key
  wins, the sets as one `unnest` upsert and the deletes as one DELETE.
- load(apply) connects (retrying with backoff for POSTGRES_CONNECT_TIMEOUT),
  creates or migrates the table (see pg_schema), then streams the live rows
  through a server-side cursor in chunks.
- While PostgreSQL is away every write fails at once with EngineUnavailable
  (the API answers 503); each connection reconnects on its own (pg_pool).
- A write whose connection failed mid-statement may or may not have
  committed. Its keys are "in doubt" until re-read from the table; the rows
  found are handed to subscribers (the service applies them to memory)
  before any later write, so memory keeps mirroring the table.
- Expired rows are purged in the background in bounded batches.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredLock,
    fail,
    inlineCallbacks,
    succeed,
)
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from txpostgres.psycopg2_impl import psycopg2
from txpostgres.reconnection import ConnectionDead

from dache.config import ConfigError
from dache.engines import SET, Change, EngineHealth, EngineUnavailable
from dache.engines.pg_pool import (
    CONNECTION_ERRORS,
    PooledConnection,
    ReconnectingPool,
    backoff,
    describe,
    shield,
)
from dache.engines.pg_schema import CURRENT_SHAPE, SHAPE_0_3_0, TableSQL, describe_shape
from dache.service import StartupError

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
LOAD_CHUNK = 10_000  # rows per FETCH at start-up
PURGE_INTERVAL = 30.0  # seconds between purges of expired rows
PURGE_BATCH = 1_000  # rows per purge statement
PURGE_ROUNDS = 100  # statements per purge, at most
ATTEMPT_TIMEOUT = 10.0  # seconds one connection attempt may take
CHECK_TIMEOUT = 2.0  # seconds a health check waits for PostgreSQL

UNREACHABLE = "PostgreSQL is unreachable (dache is reconnecting); the write was not made"


@dataclass(frozen=True)
class PostgresSettings:
    host: str
    port: int
    database: str
    user: str
    password: str | None = field(default=None, repr=False)
    sslmode: str | None = None
    table: str = "dache"
    pool_size: int = 2
    connect_timeout: float = 30.0

    @property
    def where(self) -> str:
        """Where we connect, for logs: never the password."""
        return f"{self.user}@{self.host}:{self.port}/{self.database}"

    def conninfo(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "dbname": self.database,
            "user": self.user,
            "application_name": "dache",
            "client_encoding": "UTF8",
            # Notice a vanished server (no FIN: host down, partition) in seconds,
            # not in the kernel's default two hours.
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 3,
            "keepalives_count": 3,
        }
        if psycopg2.extensions.libpq_version() >= 120000:
            info["tcp_user_timeout"] = 15_000  # ms an unacknowledged send may wait
        if self.password is not None:
            info["password"] = self.password
        if self.sslmode is not None:
            info["sslmode"] = self.sslmode
        return info


def settings_from_config(config: Any) -> PostgresSettings:
    """The engine's settings, or ConfigError naming the one that is missing or unusable."""
    for setting, option in (
        ("POSTGRES_HOST", "--postgres-host"),
        ("POSTGRES_DATABASE", "--postgres-database"),
        ("POSTGRES_USER", "--postgres-user"),
    ):
        if not getattr(config, setting.lower(), None):
            raise ConfigError(f"{setting} is required for the postgres engine (or {option})")
    password = config.postgres_password
    if config.postgres_password_file:
        if password:
            raise ConfigError("give POSTGRES_PASSWORD or POSTGRES_PASSWORD_FILE, not both")
        path = config.postgres_password_file
        try:
            password = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as e:
            reason = getattr(e, "strerror", None) or "not UTF-8 text"
            raise ConfigError(f"POSTGRES_PASSWORD_FILE {path!r} cannot be read: {reason}")
    return PostgresSettings(
        host=config.postgres_host,
        port=config.postgres_port,
        database=config.postgres_database,
        user=config.postgres_user,
        password=password or None,
        sslmode=config.postgres_sslmode,
        table=config.postgres_table,
        pool_size=config.postgres_pool_size,
        connect_timeout=config.postgres_connect_timeout,
    )


def to_timestamp(seconds: float) -> datetime:
    return EPOCH + timedelta(microseconds=round(seconds * 1_000_000))


def to_micros_float(seconds: float) -> float:
    """`seconds` as PostgreSQL keeps it (whole microseconds), so memory equals the table."""
    return round(seconds * 1_000_000) / 1_000_000


def _row_change(row: tuple[str, str, int | None, int]) -> Change:
    key, value, micros, revision = row
    expiry = None if micros is None else micros / 1_000_000
    return Change(SET, key, value.encode("utf-8"), expiry, revision)


class PostgresEngine:
    name = "postgres"
    log = Logger()

    def __init__(
        self,
        settings: PostgresSettings,
        reactor: Any,
        purge_interval: float = PURGE_INTERVAL,
        purge_batch: int = PURGE_BATCH,
        load_chunk: int = LOAD_CHUNK,
    ):
        self.settings = settings
        self.reactor = reactor
        self.sql = TableSQL(settings.table)
        self.purge_interval = purge_interval
        self.purge_batch = purge_batch
        self.load_chunk = load_chunk
        self.pool = ReconnectingPool(
            reactor,
            settings.pool_size,
            min(settings.connect_timeout, ATTEMPT_TIMEOUT),
            on_death=self._connection_died,
            on_recovery=self._connection_back,
            **settings.conninfo(),
        )
        # Counters, for health checks, metrics and tests.
        self.transactions = 0  # committed write transactions
        self.purged = 0  # expired rows deleted
        self.available = False  # at least one connection is up
        self.down_since: float | None = None
        self._lane = DeferredLock()  # writes and in-doubt resolution, one at a time
        self._in_doubt: set[str] = set()
        self._subscribers: list[Callable[[Change], None]] = []
        self._purger: LoopingCall | None = None
        self._purging = False
        self._closed = False

    @classmethod
    def from_config(cls, config: Any, reactor: Any) -> PostgresEngine:
        return cls(settings_from_config(config), reactor)

    @staticmethod
    def check_config(config: Any) -> None:
        settings_from_config(config)

    def subscribe(self, callback: Callable[[Change], None]) -> None:
        """callback(change) for committed changes this node did not apply itself."""
        self._subscribers.append(callback)

    # -- start-up

    @inlineCallbacks
    def load(self, apply: Callable[[Change], None]) -> Any:
        yield self._connect_at_start()
        try:
            done = yield self.pool.runInteraction(self._prepare_table)
            if done is not None:  # logged once committed
                self.log.emit(*done, table=self.settings.table)
            began = time.monotonic()
            count = yield self.pool.runInteraction(self._stream_live, apply)
        except (psycopg2.Error, ConnectionDead, *CONNECTION_ERRORS) as e:
            raise StartupError(f"PostgreSQL table {self.settings.table}: {describe(e)}")
        self.log.info(
            "read {count} live rows from PostgreSQL table {table} in {seconds:.2f}s",
            count=count,
            table=self.settings.table,
            seconds=time.monotonic() - began,
        )
        self._start_purging()

    @inlineCallbacks
    def _connect_at_start(self) -> Any:
        where, timeout = self.settings.where, self.settings.connect_timeout
        deadline = self.reactor.seconds() + timeout
        delays = backoff()
        self.log.info("connecting to PostgreSQL at {where}", where=where)
        attempt = 0
        while True:
            attempt += 1
            remaining = deadline - self.reactor.seconds()
            for connection in self.pool.everyone:
                connection.connect_timeout = max(0.1, min(ATTEMPT_TIMEOUT, remaining))
            try:
                yield self.pool.connect()
            except CancelledError:
                raise  # dache is stopping
            except Exception as e:
                reason = describe(e)
                remaining = deadline - self.reactor.seconds()
                if remaining <= 0:
                    raise StartupError(
                        f"could not connect to PostgreSQL at {where} within {timeout:g}s "
                        f"(POSTGRES_CONNECT_TIMEOUT): {reason}"
                    )
                delay = min(next(delays), remaining)
                self.log.warn(
                    "PostgreSQL at {where} is not reachable (attempt {attempt}): {reason}; "
                    "retrying in {delay:.1f}s",
                    where=where,
                    attempt=attempt,
                    reason=reason,
                    delay=delay,
                )
                yield deferLater(self.reactor, delay, lambda: None)
            else:
                self.available = True
                for connection in self.pool.everyone:
                    connection.connect_timeout = min(timeout, ATTEMPT_TIMEOUT)
                self.log.info(
                    "connected to PostgreSQL at {where} ({count} connections)",
                    where=where,
                    count=len(self.pool.everyone),
                )
                return

    @inlineCallbacks
    def _prepare_table(self, cursor: Any) -> Any:
        """Create the table, or migrate a 0.3.0 one; refuse anything else. One transaction."""
        sql, name = self.sql, self.settings.table
        yield cursor.execute(sql.lock)
        yield cursor.execute("SELECT current_setting('server_encoding')")
        (encoding,) = cursor.fetchone()
        if encoding not in ("UTF8", "SQL_ASCII"):
            raise StartupError(
                f"database {self.settings.database} has encoding {encoding}; "
                "dache stores UTF-8 keys and values and needs a UTF8 database"
            )
        yield cursor.execute(sql.columns)
        columns = dict(cursor.fetchall())
        if not columns:
            for statement in sql.create:
                yield cursor.execute(statement)
            return LogLevel.info, "created PostgreSQL table {table}"
        if columns not in (CURRENT_SHAPE, SHAPE_0_3_0):
            raise StartupError(
                f"table {name} has columns ({describe_shape(columns)}), which is neither "
                "dache's shape nor dache 0.3.0's; set POSTGRES_TABLE to another table"
            )
        yield cursor.execute(sql.key_is_unique)
        if not cursor.fetchone()[0]:
            raise StartupError(f"table {name} has no primary key or unique index on key alone")
        if columns == CURRENT_SHAPE:
            return None
        yield cursor.execute(sql.count)
        (rows,) = cursor.fetchone()
        for statement in sql.migrate_0_3_0:
            yield cursor.execute(statement)
        return (
            LogLevel.warn,
            f"migrated PostgreSQL table {{table}} from the dache 0.3.0 shape: {rows} rows "
            "(string values are now JSON strings; expiry was read as UTC)",
        )

    @inlineCallbacks
    def _stream_live(self, cursor: Any, apply: Callable[[Change], None]) -> Any:
        """Hand every live row to apply, a chunk at a time (never the whole table at once)."""
        yield cursor.execute(self.sql.declare_live, (to_timestamp(self.reactor.seconds()),))
        count = 0
        while True:
            yield cursor.execute(self.sql.fetch_live, (self.load_chunk,))
            rows = cursor.fetchall()
            if not rows:
                return count
            for row in rows:
                apply(_row_change(row))
            count += len(rows)

    # -- writes

    def write(self, changes: list[Change]) -> Deferred[None]:
        if self._closed:
            return fail(EngineUnavailable("dache's PostgreSQL engine is closed"))
        if not changes:
            return succeed(None)
        return shield(self._lane.run(self._write, changes))

    @inlineCallbacks
    def _write(self, changes: list[Change]) -> Any:
        if self._in_doubt:
            yield self._resolve_in_doubt()
        keys, values, expiries, is_set = [], [], [], []
        for change in changes:
            keys.append(change.key)
            if change.kind == SET:
                values.append(change.value_json.decode("utf-8"))
                expiries.append(None if change.expiry is None else to_timestamp(change.expiry))
                is_set.append(True)
            else:
                values.append(None)
                expiries.append(None)
                is_set.append(False)
        rows = yield self._run_write((keys, values, expiries, is_set), set(keys))
        for change, (revision,) in zip(changes, rows, strict=True):
            change.revision = revision
            if change.expiry is not None:
                change.expiry = to_micros_float(change.expiry)

    @inlineCallbacks
    def _run_write(self, params: tuple[list[Any], ...], keys: Any) -> Any:
        for attempt in (1, 2):
            try:
                rows = yield self.pool.runQuery(self.sql.write, params)
            except ConnectionDead:
                raise EngineUnavailable(UNREACHABLE)
            except (*CONNECTION_ERRORS, CancelledError) as e:
                # (CancelledError: the server cancelled the statement, e.g. an
                # operator's pg_cancel_backend; our own callers never can.)
                # Sent, but did it commit? Re-writing is safe (sets and deletes
                # are idempotent), so try once more on another live connection.
                self._in_doubt.update(keys)
                if attempt == 1 and self.pool.alive:
                    continue
                raise EngineUnavailable(
                    f"the connection to PostgreSQL failed during the write ({describe(e)}); "
                    "it may not have been made"
                )
            except psycopg2.Error as e:
                self.log.error("PostgreSQL refused a write: {reason}", reason=describe(e))
                raise EngineUnavailable("PostgreSQL refused the write; see the server log")
            self._in_doubt.difference_update(keys)
            self.transactions += 1
            return rows

    @inlineCallbacks
    def _resolve_in_doubt(self) -> Any:
        """Re-read keys whose last write had an unknown outcome; hand their rows on."""
        keys = sorted(self._in_doubt)
        try:
            rows = yield self.pool.runQuery(self.sql.select_keys, (keys,))
        except ConnectionDead:
            raise EngineUnavailable(UNREACHABLE)
        except (psycopg2.Error, CancelledError, *CONNECTION_ERRORS) as e:
            raise EngineUnavailable(f"PostgreSQL could not be read ({describe(e)})")
        found = {row[0]: _row_change(row) for row in rows}
        self._in_doubt.difference_update(keys)
        for key in keys:
            change = found.get(key) or Change.delete(key)
            for callback in self._subscribers:
                callback(change)
        self.log.info("re-read {count} keys whose write had an unknown outcome", count=len(keys))

    # -- connection state

    def _connection_died(self, connection: PooledConnection, failure: Failure) -> None:
        if self._closed:
            return
        if self.available and not self.pool.alive:
            self.available = False
            self.down_since = self.reactor.seconds()
            self.log.warn(
                "lost PostgreSQL at {where}: {reason}; writes answer 503 until it is back "
                "(reconnecting)",
                where=self.settings.where,
                reason=describe(failure),
            )
        elif self.available:
            self.log.info(
                "a PostgreSQL connection failed ({reason}); reconnecting it",
                reason=describe(failure),
            )

    def _connection_back(self, connection: PooledConnection) -> None:
        if self._closed:
            return
        if not self.available:
            self.available = True
            self.log.info(
                "reconnected to PostgreSQL at {where} after {seconds:.1f}s; writes resume",
                where=self.settings.where,
                seconds=self.reactor.seconds() - (self.down_since or self.reactor.seconds()),
            )
        if self._in_doubt:
            d = self._lane.run(lambda: self._resolve_in_doubt() if self._in_doubt else None)
            d.addErrback(lambda _: None)  # still unresolved: the next write tries again

    # -- expired rows

    def _start_purging(self) -> None:
        self._purger = LoopingCall(self.purge_expired)
        self._purger.clock = self.reactor
        self._purger.start(self.purge_interval, now=False).addErrback(
            lambda f: self.log.failure("purging expired rows stopped", f)
        )

    @inlineCallbacks
    def purge_expired(self) -> Any:
        """Delete expired rows, PURGE_BATCH at a time; answers how many went."""
        if self._purging or self._closed or not self.pool.alive:
            return 0
        self._purging = True
        total = 0
        try:
            for _ in range(PURGE_ROUNDS):
                now = to_timestamp(self.reactor.seconds())
                rows = yield self.pool.runQuery(self.sql.purge, (now, self.purge_batch, now))
                total += rows[0][0]
                if rows[0][0] < self.purge_batch:
                    break
        except (psycopg2.Error, ConnectionDead, CancelledError, *CONNECTION_ERRORS) as e:
            self.log.info("purging expired rows failed ({reason}); will retry", reason=describe(e))
        finally:
            self._purging = False
        self.purged += total
        return total

    # -- health, shutdown

    def check(self) -> Deferred[EngineHealth]:
        began = self.reactor.seconds()
        d = self.pool.runQuery("SELECT 1").addTimeout(CHECK_TIMEOUT, self.reactor)

        def answered(_: object) -> EngineHealth:
            ms = (self.reactor.seconds() - began) * 1000
            return EngineHealth(True, f"PostgreSQL answered in {ms:.0f} ms", self._extra())

        def failed(failure: Failure) -> EngineHealth:
            return EngineHealth(False, f"PostgreSQL: {describe(failure)}", self._extra())

        return d.addCallbacks(answered, failed)

    def _extra(self) -> dict[str, Any]:
        return {
            "transactions": self.transactions,
            "connections": self.pool.alive,
            "pool_size": len(self.pool.everyone),
            "in_doubt": len(self._in_doubt),
        }

    def close(self) -> Deferred[None]:
        if not self._closed:
            self.log.info(
                "closing the PostgreSQL engine: {transactions} write transactions committed",
                transactions=self.transactions,
            )
        self._closed = True
        if self._purger is not None and self._purger.running:
            self._purger.stop()
        self.pool.close()
        return succeed(None)
