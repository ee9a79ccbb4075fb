"""
The PostgreSQL durability engine: every acknowledged set and delete is a row
change committed in PostgreSQL (through txpostgres) before it is visible.

- write(batch) is one transaction: first its keys' rows are locked, in key
  order (pg_schema's lock_keys: absent keys get a placeholder row), then
  every change gets a revision from the table's sequence, in batch order, so
  a key's revisions commit in the order they were taken (for other nodes
  following the table, pg_follow); the last change per key wins, the sets as
  one `unnest` upsert and the deletes as one DELETE leaving tombstones; a
  NOTIFY carries the highest revision. Nodes writing different keys never
  wait for each other. Without preconditions that is one round trip (one
  query string); a batch with preconditions, read-modify-writes or a range
  delete reads its keys' rows once they are locked and decides there
  (decides_preconditions), so nodes racing on a key cannot both win, and a
  range delete also takes the keys this node has not followed yet.
- load(apply) connects (retrying with backoff for POSTGRES_CONNECT_TIMEOUT),
  creates or migrates the table (see pg_schema), then streams the live rows
  through a server-side cursor in chunks, in one snapshot whose revision is
  where following other nodes' changes starts (pg_follow, once follow() gave
  it the node's memory).
- While PostgreSQL is away every write fails at once with EngineUnavailable
  (the API answers 503); each connection reconnects on its own (pg_pool).
- A write whose connection failed mid-statement may or may not have
  committed. Its keys are "in doubt" until the next catch-up, which reads
  whatever did commit (memory applies it by revision, so the order in which
  that happens does not matter).
- Expired rows are purged in the background in bounded batches, by one node
  per interval; tombstones older than the retention go with them.
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

from dache.engines import SET, Change, EngineHealth, EngineUnavailable
from dache.engines.decide import State, decide, reads_state
from dache.engines.pg_follow import READ_ERRORS, TableFollower, row_change, stream_snapshot
from dache.engines.pg_pool import (
    CONNECTION_ERRORS,
    PooledConnection,
    ReconnectingPool,
    backoff,
    describe,
    shield,
)
from dache.engines.pg_schema import (
    CURRENT_SHAPE,
    SHAPE_0_3_0,
    SHAPE_REVISION,
    TableSQL,
    describe_shape,
)
from dache.errors import ConfigError, StartupError

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
LOAD_CHUNK = 10_000  # rows per FETCH at start-up
PURGE_INTERVAL = 30.0  # seconds between purges of expired rows (one node purges)
TOMBSTONE_RETENTION = 3600.0  # seconds deletes stay readable by following nodes
PURGE_BATCH = 1_000  # rows per purge statement
PURGE_ROUNDS = 100  # statements per purge, at most
PREDICTED = 1 << 62  # decide()'s numbering of a batch's writes, above any real revision
ATTEMPT_TIMEOUT = 10.0  # seconds one connection attempt may take
CHECK_TIMEOUT = 2.0  # seconds a health check waits for PostgreSQL

UNREACHABLE = "PostgreSQL is unreachable (dache is reconnecting); the write was not made"


@dataclass(frozen=True)
class PostgresSettings:
    host: str  # one, or several comma-separated (a primary and its standbys)
    port: int | str  # one, or one per host
    database: str
    user: str
    password: str | None = field(default=None, repr=False)
    sslmode: str | None = None
    table: str = "dache"
    pool_size: int = 2
    connect_timeout: float = 30.0
    tombstone_retention: float = TOMBSTONE_RETENTION
    purge_interval: float = PURGE_INTERVAL

    @property
    def where(self) -> str:
        """Where we connect, for logs: never the password."""
        hosts, ports = self.hosts()
        places = ",".join(f"{host}:{port}" for host, port in zip(hosts, ports, strict=True))
        return f"{self.user}@{places}/{self.database}"

    def hosts(self) -> tuple[list[str], list[str]]:
        """The hosts, and a port for each."""
        hosts = self.host.split(",")
        ports = str(self.port).split(",")
        return hosts, ports * len(hosts) if len(ports) == 1 else ports

    def conninfo(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "host": self.host,
            "port": str(self.port),
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
        if "," in self.host:
            # A primary and its standbys: libpq tries each in turn and keeps the one
            # that accepts writes, so after a failover a reconnect finds the new primary.
            info["target_session_attrs"] = "read-write"
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
    hosts, ports = config.postgres_host.split(","), str(config.postgres_port).split(",")
    if len(ports) not in (1, len(hosts)):
        raise ConfigError(
            f"POSTGRES_PORT has {len(ports)} ports for {len(hosts)} POSTGRES_HOST hosts: "
            "give one port, or one per host"
        )
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
        tombstone_retention=config.postgres_tombstone_retention,
        purge_interval=config.postgres_purge_interval,
    )


def to_timestamp(seconds: float) -> datetime:
    return EPOCH + timedelta(microseconds=round(seconds * 1_000_000))


def to_micros_float(seconds: float) -> float:
    """`seconds` as PostgreSQL keeps it (whole microseconds), so memory equals the table."""
    return round(seconds * 1_000_000) / 1_000_000


def like_prefix(prefix: str) -> str:
    """A LIKE pattern matching the keys that start with prefix."""
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"


def with_range_deletes(
    changes: list[Change], current: dict[str, State]
) -> tuple[list[Change], list[Change]]:
    """
    The batch with, after each range delete's group, a delete of every live key
    under its prefix that the group does not name (keys another node wrote
    that this node had not followed yet); and those deletes.
    """
    expanded: list[Change] = []
    extras: list[Change] = []
    for change in changes:
        expanded.append(change)
        group = change.group
        if group is None or group.prefix is None or change is not group.changes[-1]:
            continue
        named = {member.key for member in group.changes}
        more = [
            Change.delete(key)
            for key in sorted(current)
            if key.startswith(group.prefix) and key not in named
        ]
        group.extra = len(more)
        expanded += more
        extras += more
    return expanded, extras


def write_params(changes: list[Change]) -> tuple[list[Any], ...]:
    """The write statement's parameters: keys, values, expiries, is-a-set flags."""
    keys, values, expiries, is_set = [], [], [], []
    for change in changes:
        keys.append(change.key)
        if change.kind == SET:
            assert change.value_json is not None
            values.append(change.value_json.decode("utf-8"))
            expiries.append(None if change.expiry is None else to_timestamp(change.expiry))
            is_set.append(True)
        else:
            values.append(None)
            expiries.append(None)
            is_set.append(False)
    return keys, values, expiries, is_set


class PostgresEngine:
    name = "postgres"
    decides_preconditions = True  # in the transaction: other nodes write the table too
    log = Logger()

    def __init__(
        self,
        settings: PostgresSettings,
        reactor: Any,
        purge_interval: float | None = None,
        purge_batch: int = PURGE_BATCH,
        load_chunk: int = LOAD_CHUNK,
    ):
        self.settings = settings
        self.reactor = reactor
        self.sql = TableSQL(settings.table)
        self.purge_interval = settings.purge_interval if purge_interval is None else purge_interval
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
        self.pruned = 0  # tombstones deleted
        self.available = False  # at least one connection is up
        self.down_since: float | None = None
        self._lane = DeferredLock()  # this node's writes, one at a time
        self._in_doubt: set[str] = set()  # keys of writes of unknown outcome
        self.follower: TableFollower | None = None  # once follow() was called
        self._target: Any = None
        self._purger: LoopingCall | None = None
        self._purging = False
        self._closed = False

    @classmethod
    def from_config(cls, config: Any, reactor: Any) -> PostgresEngine:
        return cls(settings_from_config(config), reactor)

    @staticmethod
    def check_config(config: Any) -> None:
        settings_from_config(config)

    def follow(self, target: Any) -> None:
        """
        Before load(): hand every change other nodes commit (and whatever a write
        of unknown outcome did) to target, a dache.store.follow.FollowedCache.
        """
        self._target = target
        self.follower = TableFollower(
            self.reactor,
            self.sql,
            self.settings.conninfo(),
            min(self.settings.connect_timeout, ATTEMPT_TIMEOUT),
            self._snapshot,
            self._backends,
        )

    def _backends(self) -> set[int]:
        """The backend pids of the write pool's live connections."""
        return {c._connection.get_backend_pid() for c in self.pool.everyone if c.alive}

    def _snapshot(self, cursor: Any, apply: Callable[[Change], None]) -> Deferred[Any]:
        """An interaction: every live row, in one snapshot; answers (rows, revision)."""
        now = to_timestamp(self.reactor.seconds())
        return stream_snapshot(cursor, self.sql, now, self.load_chunk, apply)

    # -- start-up

    @inlineCallbacks
    def load(self, apply: Callable[[Change], None]) -> Any:
        yield self._connect_at_start()
        try:
            done = yield self.pool.runInteraction(self._prepare_table)
            if done is not None:  # logged once committed
                self.log.emit(*done, table=self.settings.table)
            yield self.pool.prepare(self.sql.prepare)
            if self.follower is not None:
                yield self.follower.pool.prepare(self.sql.prepare)
            began = time.monotonic()
            count, revision = yield self.pool.runInteraction(self._snapshot, apply)
        except (psycopg2.Error, ConnectionDead, *CONNECTION_ERRORS) as e:
            raise StartupError(f"PostgreSQL table {self.settings.table}: {describe(e)}")
        self.log.info(
            "read {count} live rows from PostgreSQL table {table} in {seconds:.2f}s "
            "(as of revision {revision})",
            count=count,
            table=self.settings.table,
            seconds=time.monotonic() - began,
            revision=revision,
        )
        if self.follower is not None:
            self.follower.start(self._target, revision)
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
            for connection in self._all_connections():
                connection.connect_timeout = max(0.1, min(ATTEMPT_TIMEOUT, remaining))
            try:
                yield self._connect_all()
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
                for connection in self._all_connections():
                    connection.connect_timeout = min(timeout, ATTEMPT_TIMEOUT)
                self.log.info(
                    "connected to PostgreSQL at {where} ({count} connections{following})",
                    where=where,
                    count=len(self.pool.everyone),
                    following=", and one following other nodes' changes" if self.follower else "",
                )
                return

    def _all_connections(self) -> list[PooledConnection]:
        followers = self.follower.pool.everyone if self.follower is not None else ()
        return [*self.pool.everyone, *followers]

    @inlineCallbacks
    def _connect_all(self) -> Any:
        yield self.pool.connect()
        if self.follower is None:
            return
        try:
            yield self.follower.connect()  # LISTEN before the load's snapshot
        except BaseException:
            self.pool.disconnect()
            self.follower.disconnect()
            raise

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
            for statement in sql.create + sql.create_followed:
                yield cursor.execute(statement)
            return LogLevel.info, "created PostgreSQL table {table}"
        if columns not in (CURRENT_SHAPE, SHAPE_REVISION, SHAPE_0_3_0):
            raise StartupError(
                f"table {name} has columns ({describe_shape(columns)}), which is neither "
                "dache's shape nor dache 0.3.0's; set POSTGRES_TABLE to another table"
            )
        yield cursor.execute(sql.key_is_unique)
        if not cursor.fetchone()[0]:
            raise StartupError(f"table {name} has no primary key or unique index on key alone")
        if columns in (CURRENT_SHAPE, SHAPE_REVISION):
            yield cursor.execute(sql.followed_objects)
            if cursor.fetchone()[0]:
                return None
            for statement in sql.create_followed:
                yield cursor.execute(statement)
            return (
                LogLevel.info,
                "added what following other nodes needs to PostgreSQL table {table} "
                "(tombstones, a revision index, the writing transaction of each row)",
            )
        yield cursor.execute(sql.count)
        (rows,) = cursor.fetchone()
        for statement in sql.migrate_0_3_0 + sql.create_followed:
            yield cursor.execute(statement)
        return (
            LogLevel.warn,
            f"migrated PostgreSQL table {{table}} from the dache 0.3.0 shape: {rows} rows "
            "(string values are now JSON strings; expiry was read as UTC)",
        )

    # -- replay for watchers (dache.web.watch)

    @inlineCallbacks
    def changes_since(self, since: int, limit: int) -> Any:
        """
        The table's changes above `since` up to the follower's watermark (each
        key's latest: a row or a tombstone), oldest first: (the watermark,
        [Change]), or None when tombstones above `since` were pruned or there
        are more than `limit` (the watcher must reset).
        """
        through = self.follower.watermark if self.follower is not None else since
        if through <= since:
            return since, []
        rows = yield self.pool.runQuery(
            self.sql.changes_since, {"since": since, "through": through, "limit": limit}
        )
        if rows[0][0] > since:
            return None  # deletes above `since` are forgotten
        changes = [row_change(*row[1:]) for row in rows if row[1] is not None]
        if len(changes) >= limit:
            return None
        # Up to the watermark: nothing at or below it can commit any more.
        return through, changes

    # -- writes

    def write(self, changes: list[Change]) -> Deferred[None]:
        if self._closed:
            return fail(EngineUnavailable("dache's PostgreSQL engine is closed"))
        if not changes:
            return succeed(None)
        return shield(self._lane.run(self._write, changes))

    @inlineCallbacks
    def _write(self, changes: list[Change]) -> Any:
        keys = {change.key for change in changes}
        if any(change.decided for change in changes):
            # Not retried: a first attempt that did commit would fail its own
            # precondition (or increment twice) the second time.
            rows, written, extras = yield self._attempt(
                lambda: self.pool.runInteraction(self._decide_and_write, changes), keys, False
            )
        else:
            params = (sorted(keys), *write_params(changes), [])
            rows = yield self._attempt(lambda: self.pool.runQuery(self.sql.write, params), keys)
            written, extras = changes, []
        if not written:
            return
        for change, (revision, _) in zip(written, rows, strict=True):
            change.revision = revision
            if change.expiry is not None:
                change.expiry = to_micros_float(change.expiry)
        if self._target is not None:
            for extra in extras:  # a range delete's keys this node did not hold
                self._target.apply(extra)
        if self.follower is not None:
            self.follower.own_write(int(rows[0][1]), written[-1].revision)

    @inlineCallbacks
    def _decide_and_write(self, cursor: Any, changes: list[Change]) -> Any:
        """
        An interaction: lock the batch's keys (and the keys its range deletes
        find in the table), decide the batch (preconditions, read-modify-writes,
        groups: dache.engines.decide) against the table as each change will find
        it, then write what it leaves. Answers the written rows (revision,
        transaction), the changes written, and the deletes a range delete added.
        """
        prefixes = sorted(
            {c.group.prefix for c in changes if c.group is not None and c.group.prefix is not None}
        )
        ranged: list[str] = []
        if prefixes:
            yield cursor.execute(self.sql.keys_like, ([like_prefix(p) for p in prefixes],))
            ranged = [key for (key,) in cursor.fetchall()]
        yield cursor.execute(self.sql.lock_keys, (sorted({c.key for c in changes} | set(ranged)),))
        placeholders = {key for (key,) in cursor.fetchall()}
        needed = sorted({change.key for change in changes if reads_state(change)} | set(ranged))
        now = self.reactor.seconds()
        current: dict[str, State] = {}
        if needed:
            yield cursor.execute(self.sql.current, (needed,))
            for key, revision, micros, value in cursor.fetchall():
                # Expired by this node's clock: absent.
                if micros is None or micros / 1_000_000 > now:
                    expiry = None if micros is None else micros / 1_000_000
                    current[key] = (value.encode("utf-8"), expiry, revision)
        expanded, extras = with_range_deletes(changes, current)
        # Revisions come from the sequence when written: decide() numbers the
        # writes from PREDICTED, and those numbers are replaced below.
        kept = decide(expanded, current.get, PREDICTED, now)
        rows: list[Any] = []
        if kept:
            unwritten = sorted(placeholders - {change.key for change in kept})
            yield cursor.execute(self.sql.write_locked, (*write_params(kept), unwritten))
            rows = cursor.fetchall()
        elif placeholders:
            yield cursor.execute(self.sql.drop_placeholders, (sorted(placeholders),))
        for change in expanded:  # rejected ones and reads may name a predicted revision
            if change.revision >= PREDICTED:
                i = change.revision - PREDICTED
                # (beyond the writes: a member of a group rejected as a whole, not reported)
                change.revision = rows[i][0] if i < len(rows) else 0
        return rows, kept, extras

    @inlineCallbacks
    def _attempt(self, run: Callable[[], Deferred[Any]], keys: set[str], retry: bool = True) -> Any:
        for attempt in (1, 2):
            try:
                result = yield run()
            except ConnectionDead:
                self._resolve_later(keys)  # (if the first attempt left them in doubt)
                raise EngineUnavailable(UNREACHABLE)
            except (*CONNECTION_ERRORS, CancelledError) as e:
                # (CancelledError: the server cancelled the statement, e.g. an
                # operator's pg_cancel_backend; our own callers never can.)
                # Sent, but did it commit? Re-writing is safe (sets and deletes
                # are idempotent), so try once more on another live connection.
                self._in_doubt.update(keys)
                if retry and attempt == 1 and self.pool.alive:
                    continue
                self._resolve_later(keys)
                raise EngineUnavailable(
                    f"the connection to PostgreSQL failed during the write ({describe(e)}); "
                    "it may not have been made"
                )
            except psycopg2.Error as e:
                self._resolve_later(keys)
                self.log.error("PostgreSQL refused a write: {reason}", reason=describe(e))
                raise EngineUnavailable("PostgreSQL refused the write; see the server log")
            self._in_doubt.difference_update(keys)
            self.transactions += 1
            return result

    def _resolve_later(self, keys: set[str]) -> None:
        """Keys of a write of unknown outcome: the next catch-up reads what committed."""
        if self.follower is None or not keys & self._in_doubt:
            return
        self.follower.caught_up().addCallback(lambda _: self._in_doubt.difference_update(keys))

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

    # -- expired rows

    def _start_purging(self) -> None:
        self._purger = LoopingCall(self._purge_if_due)
        self._purger.clock = self.reactor
        self._purger.start(self.purge_interval, now=False).addErrback(
            lambda f: self.log.failure("purging expired rows stopped", f)
        )

    @inlineCallbacks
    def _purge_if_due(self) -> Any:
        """Purge unless another node did within the last half interval (one purge for all)."""
        if self._purging or self._closed or not self.pool.alive:
            return
        try:
            claimed = yield self.pool.runQuery(self.sql.claim_purge, (self.purge_interval / 2,))
        except READ_ERRORS:
            return  # PostgreSQL is away: its outage is logged elsewhere; next time
        if claimed:
            yield self.purge_expired()

    @inlineCallbacks
    def purge_expired(self) -> Any:
        """
        Delete expired rows and tombstones past the retention, PURGE_BATCH at a
        time; answers how many expired rows went.
        """
        if self._purging or self._closed or not self.pool.alive:
            return 0
        self._purging = True
        total = 0
        retention = self.settings.tombstone_retention
        try:
            for _ in range(PURGE_ROUNDS):
                now = to_timestamp(self.reactor.seconds())
                rows = yield self.pool.runQuery(self.sql.purge, (now, self.purge_batch, now))
                total += rows[0][0]
                if rows[0][0] < self.purge_batch:
                    break
            for _ in range(PURGE_ROUNDS):
                rows = yield self.pool.runQuery(
                    self.sql.prune, (retention, self.purge_batch, retention)
                )
                self.pruned += rows[0][0]
                if rows[0][0] < self.purge_batch:
                    break
        except READ_ERRORS as e:
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
        extra = {
            "transactions": self.transactions,
            "connections": self.pool.alive,
            "pool_size": len(self.pool.everyone),
            "in_doubt": len(self._in_doubt),
        }
        if self.follower is not None:
            extra["following"] = self.follower.listening
            extra["revision"] = self.follower.watermark
        return extra

    def close(self) -> Deferred[None]:
        if not self._closed:
            self.log.info(
                "closing the PostgreSQL engine: {transactions} write transactions committed",
                transactions=self.transactions,
            )
        self._closed = True
        if self._purger is not None and self._purger.running:
            self._purger.stop()
        if self.follower is not None:
            self.follower.close()
        self.pool.close()
        return succeed(None)
