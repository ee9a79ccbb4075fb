"""
Following the table: how a node learns of the changes other nodes commit.

Every write transaction (postgres.py) takes the table's advisory lock before
it takes revisions from the sequence, so revisions commit in the order they
were taken, and it NOTIFYs the table's channel with its highest revision. So
"every change above revision N" is a question with a stable answer: once a
change of revision M is visible, so is every change below M.

A node keeps a watermark: every change up to it is applied to its memory. It
LISTENs on a connection of its own, and a notification is only a wake-up
(notifications are lost while a connection is down): `catch_up` reads every
row and tombstone above the watermark, oldest first, in chunks, hands each to
the node's FollowedCache (dache.store.follow: never goes back) and moves the
watermark. It runs on every notification above the watermark (one at a time,
re-run if woken meanwhile), after every reconnect (LISTEN re-issued first),
and every POLL_INTERVAL in case a notification was lost.

Tombstones are pruned after a retention window, recorded as pruned_through; a
node whose watermark is below it may have missed a delete, so it reloads the
table in one snapshot and carries on from there.

The node's own writes move the watermark too, without a read, when they follow
it directly (their first revision is watermark + 1; otherwise they wake a
catch-up); their notifications (from the node's own backends) wake nobody.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres.psycopg2_impl import psycopg2
from txpostgres.reconnection import ConnectionDead

from dache.engines import DELETE, SET, Change
from dache.engines.pg_pool import CONNECTION_ERRORS, ReconnectingPool, describe
from dache.engines.pg_schema import TableSQL

POLL_INTERVAL = 5.0  # seconds between catch-ups when no notification comes
CHUNK = 5_000  # changes per catch-up statement
FOLLOWER_APPLICATION = "dache-follower"  # its application_name in pg_stat_activity

READ_ERRORS = (psycopg2.Error, ConnectionDead, CancelledError, *CONNECTION_ERRORS)


def row_change(key: str, value: str | None, micros: int | None, revision: int) -> Change:
    """A catch-up row as a Change: a set (a row), or a delete (a tombstone: value NULL)."""
    if value is None:
        return Change(DELETE, key, revision=revision)
    expiry = None if micros is None else micros / 1_000_000
    return Change(SET, key, value.encode("utf-8"), expiry, revision)


@inlineCallbacks
def stream_snapshot(
    cursor: Any, sql: TableSQL, now: Any, chunk: int, apply: Callable[[Change], None]
) -> Any:
    """
    Inside a fresh transaction: hand every live row to apply, a chunk at a time,
    all from one snapshot. Answers (rows, revision): every change up to that
    revision is in the snapshot, so following carries on from there.
    """
    yield cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
    yield cursor.execute(sql.snapshot_revision)
    (revision,) = cursor.fetchone()
    yield cursor.execute(sql.declare_live, (now,))
    count = 0
    while True:
        yield cursor.execute(sql.fetch_live, (chunk,))
        rows = cursor.fetchall()
        if not rows:
            return count, revision
        for key, value, micros, row_revision in rows:
            apply(row_change(key, value, micros, row_revision))
        count += len(rows)


class TableFollower:
    """A node's view of the table's changes: LISTEN, watermark, catch-up, reload."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        sql: TableSQL,
        conninfo: dict[str, Any],
        connect_timeout: float,
        snapshot: Callable[[Any, Callable[[Change], None]], Deferred[Any]],
        own_backends: Callable[[], set[int]] = set,
        poll_interval: float = POLL_INTERVAL,
        chunk: int = CHUNK,
    ):
        self.reactor = reactor
        self.sql = sql
        self.snapshot = snapshot  # runs stream_snapshot in an interaction
        self.own_backends = own_backends  # backend pids of this node's writes
        self.poll_interval = poll_interval
        self.chunk = chunk
        self.pool = ReconnectingPool(
            reactor,
            1,
            connect_timeout,
            on_death=lambda _, failure: self._lost(failure),
            on_recovery=lambda _: self._reconnected(),
            **{**conninfo, "application_name": FOLLOWER_APPLICATION},
        )
        self.target: Any = None  # a dache.store.follow.FollowedCache
        self.watermark = 0  # every change up to this revision is applied
        self.listening = False
        # Counters, for health and tests.
        self.catch_ups = 0
        self.changes = 0
        self.reloads = 0
        self._started = False
        self._closed = False
        self._wanted = False
        self._busy = False
        self._waiting: list[Deferred[None]] = []
        self._poller: LoopingCall | None = None
        self._failing = False

    # -- lifecycle

    @inlineCallbacks
    def connect(self) -> Any:
        """Open the listening connection and LISTEN (before the load's snapshot is taken)."""
        yield self.pool.connect()
        connection = next(iter(self.pool.everyone))
        connection.addNotifyObserver(self._notified)
        yield self.pool.runOperation(self.sql.listen)
        self.listening = True

    def disconnect(self) -> None:
        self.pool.disconnect()

    def start(self, target: Any, watermark: int) -> None:
        """Follow from `watermark` (the load's snapshot revision), into target."""
        self.target = target
        self.watermark = watermark
        self._started = True
        self._poller = LoopingCall(self.wake)
        self._poller.clock = self.reactor
        self._poller.start(self.poll_interval, now=False)
        self.wake()  # whatever committed between the snapshot and now

    def close(self) -> None:
        self._closed = True
        if self._poller is not None and self._poller.running:
            self._poller.stop()
        self.pool.close()

    # -- wake-ups

    def _notified(self, notify: Any) -> None:
        if notify.pid in self.own_backends():
            return  # this node's own write: own_write() moves the watermark
        try:
            revision = int(notify.payload)
        except ValueError:
            revision = None
        if revision is None or revision > self.watermark:
            self.wake()

    def _lost(self, failure: Failure) -> None:
        self.listening = False
        if not self._closed:
            self.log.info(
                "the connection following other nodes' changes failed ({reason}); reconnecting",
                reason=describe(failure),
            )

    def _reconnected(self) -> None:
        if self._closed:
            return
        d = self.pool.runOperation(self.sql.listen)

        def listening(_: object) -> None:
            self.listening = True
            self.log.info("following other nodes' changes again; catching up")
            self.wake()

        d.addCallbacks(listening, lambda f: None)  # failed: the detector reconnects again

    def own_write(self, first: int, last: int) -> None:
        """This node committed revisions first..last and applies them itself."""
        if first == self.watermark + 1:
            self.watermark = last
            self.target.advanced(last)
        else:  # others' changes (or a gap) in between: read up to here
            self.wake()

    def caught_up(self) -> Deferred[None]:
        """Fires once a catch-up that starts after this call has finished."""
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        self.wake()
        return d

    def wake(self) -> None:
        self._wanted = True
        if self._busy or not self._started or self._closed:
            return
        self._busy = True
        self._run().addErrback(lambda f: self.log.failure("following the table failed", f))

    @inlineCallbacks
    def _run(self) -> Any:
        try:
            while self._wanted and not self._closed:
                self._wanted = False
                waiting, self._waiting = self._waiting, []
                try:
                    yield self._catch_up()
                except READ_ERRORS as e:
                    self._waiting[:0] = waiting  # served by the next catch-up
                    if not self._failing:
                        self._failing = True
                        self.log.info(
                            "catching up with other nodes' changes failed ({reason}); will retry",
                            reason=describe(e),
                        )
                    return  # the reconnection or the next poll wakes us again
                self._failing = False
                for d in waiting:
                    d.callback(None)
        finally:
            self._busy = False

    # -- reading changes

    @inlineCallbacks
    def _catch_up(self) -> Any:
        self.catch_ups += 1
        while True:
            since = self.watermark
            rows = yield self.pool.runQuery(
                self.sql.changes_since, {"since": since, "limit": self.chunk}
            )
            if self._closed:
                return
            pruned_through = rows[0][0]
            if pruned_through > since:
                yield self._reload(since, pruned_through)
                continue
            changes = [row_change(*row[1:]) for row in rows if row[1] is not None]
            for change in changes:
                self.target.apply(change)
            self.changes += len(changes)
            # Everything up to `top` is now in memory: the snapshot saw top, and
            # revisions commit in order. No older change can come any more.
            top = max(since, changes[-1].revision) if changes else since
            self.watermark = max(self.watermark, top)
            self.target.settled(top)
            if len(changes) < self.chunk:
                return

    @inlineCallbacks
    def _reload(self, since: int, pruned_through: int) -> Any:
        self.log.warn(
            "this node missed deletes older than the tombstones kept (it had revision "
            "{since}, tombstones were pruned through {pruned}): reloading the table",
            since=since,
            pruned=pruned_through,
        )
        began = self.reactor.seconds()
        reload = self.target.reloading()
        count, revision = yield self.pool.runInteraction(self.snapshot, reload.apply)
        dropped = reload.finish(revision)
        self.watermark = revision
        self.reloads += 1
        self.log.info(
            "reloaded {count} rows ({dropped} entries dropped) in {seconds:.2f}s; "
            "following from revision {revision}",
            count=count,
            dropped=dropped,
            seconds=self.reactor.seconds() - began,
            revision=revision,
        )
