"""
Following the table: how a node learns of the changes other nodes commit.

Writers do not serialise (postgres.py): each locks its keys' rows, then takes
revisions from the sequence, so a key's revisions commit in order, but a
transaction holding revision 9 may commit after another committed 10, and an
aborted one leaves a gap. "Every change up to revision N" is found from
transactions instead: every row and tombstone records its writing
transaction (`xid`), and a catch-up reads in one snapshot both the changes
and that snapshot's in-progress transactions (`pg_snapshot_xip`).

- A transaction that was not yet running at the previous snapshot takes its
  revisions after that snapshot began, so above every revision it held
  (`visible`). So each transaction seen in progress has a lower bound; the
  watermark is the snapshot's highest revision, capped below the bound of
  every transaction still in progress (or finished but not yet read): no
  change at or below it can commit any more.
- Each catch-up reads the changes above `read_through` (everything visible
  below it has been read), plus those of the transactions it saw in progress
  earlier (they may commit revisions below it), except this node's own
  transactions (the committer applied them).
- A node's load (and a reload) starts its snapshot holding the table's
  advisory lock exclusively for that instant (writers hold it shared): no
  write is in progress in that snapshot, so everything up to its highest
  revision is in it.

A node keeps the watermark: every change up to it is applied to its memory.
It LISTENs on a connection of its own, and a notification is only a wake-up
(notifications are lost while a connection is down): `catch_up` reads as
above, oldest first, in chunks, hands each change to the node's
FollowedCache (dache.store.follow: never goes back) and moves the watermark.
It runs on every notification above the watermark (one at a time, re-run if
woken meanwhile), after every reconnect (LISTEN re-issued first), after the
node's own writes, and every POLL_INTERVAL in case a notification was lost.

Tombstones are pruned after a retention window, recorded as pruned_through; a
node whose watermark is below it may have missed a delete, so it reloads the
table in one snapshot and carries on from there.

A transaction that stays open in the PostgreSQL cluster (any database: their
ids share one counter) holds the watermark below what it might commit until
it ends: other nodes' changes are applied at once all the same, but watch
events wait for the watermark.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks, maybeDeferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres.psycopg2_impl import psycopg2
from txpostgres.reconnection import ConnectionDead

from dache.engines import DELETE, SET, Change
from dache.engines.pg_pool import CONNECTION_ERRORS, ReconnectingPool, describe
from dache.engines.pg_schema import TableSQL

POLL_INTERVAL = 5.0  # seconds between catch-ups when no notification comes
# After this node's own write, the catch-up that moves the watermark past it
# waits this long, so that under load one serves several writes.
OWN_WRITE_DELAY = 0.005
CHUNK = 5_000  # changes per catch-up statement
FOLLOWER_APPLICATION = "dache-follower"  # its application_name in pg_stat_activity

READ_ERRORS = (psycopg2.Error, ConnectionDead, CancelledError, *CONNECTION_ERRORS)


def row_change(key: str, value: str | None, micros: int | None, revision: int) -> Change:
    """A catch-up row as a Change: a set (a row), or a delete (a tombstone: value NULL)."""
    if value is None:
        return Change(DELETE, key, revision=revision)
    expiry = None if micros is None else micros / 1_000_000
    return Change(SET, key, value.encode("utf-8"), expiry, revision)


FENCE_TIMEOUT = "5s"  # how long a load waits for the writes in progress to end


@inlineCallbacks
def stream_snapshot(
    cursor: Any, sql: TableSQL, now: Any, chunk: int, apply: Callable[[Change], None]
) -> Any:
    """
    Inside a fresh transaction: hand every live row to apply, a chunk at a time,
    all from one snapshot. Answers (rows, revision): every change up to that
    revision is in the snapshot, so following carries on from there.

    The snapshot begins while this session holds the table's advisory lock
    exclusively (writers hold it shared for their whole transaction), so no
    write is in progress in it; the lock is a session lock, released as soon
    as the snapshot exists, so writers wait only for that instant.
    """
    yield cursor.execute(f"SET LOCAL lock_timeout = '{FENCE_TIMEOUT}'")
    yield cursor.execute(sql.fence)
    try:
        yield cursor.execute("COMMIT")  # (the session lock stays)
        yield cursor.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        yield cursor.execute(sql.snapshot_revision)  # the snapshot begins here
        (revision,) = cursor.fetchone()
    except BaseException:
        yield _quietly(cursor, "ROLLBACK")
        yield _quietly(cursor, sql.unfence)
        raise
    yield cursor.execute(sql.unfence)
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


def _quietly(cursor: Any, statement: str) -> Deferred[Any]:
    """Run a statement whose failure does not matter (the connection may be gone)."""
    return maybeDeferred(cursor.execute, statement).addErrback(lambda _: None)


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
        self.read_through = 0  # every change visible below this was read (or is own)
        self.visible = 0  # the last snapshot's highest revision
        # Transactions seen in progress whose rows may be unread -> the revision
        # all of theirs are above.
        self.in_progress: dict[int, int] = {}
        self._own: dict[int, int] = {}  # this node's committed transactions -> last revision
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
        self._own_wake: Any = None  # the pending wake-up after own writes
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
        self.watermark = self.read_through = self.visible = watermark
        self._started = True
        self._poller = LoopingCall(self.wake)
        self._poller.clock = self.reactor
        self._poller.start(self.poll_interval, now=False)
        self.wake()  # whatever committed between the snapshot and now

    def close(self) -> None:
        self._closed = True
        if self._poller is not None and self._poller.running:
            self._poller.stop()
        if self._own_wake is not None and self._own_wake.active():
            self._own_wake.cancel()
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

    def own_write(self, transaction: int, last: int) -> None:
        """
        This node committed `transaction`, revisions up to `last`, and applied
        them itself: catch-ups leave its rows out, and the next one moves the
        watermark past it once no other transaction holds it back.
        """
        self._own[transaction] = last
        if self._own_wake is None or not self._own_wake.active():
            self._own_wake = self.reactor.callLater(OWN_WRITE_DELAY, self.wake)

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
                if self._own_wake is not None and self._own_wake.active():
                    # this catch-up covers every own write noted so far; a wake-up
                    # left pending would start one while a later own write is in
                    # flight, and read its rows back before it is noted as own
                    self._own_wake.cancel()
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
        after = self.watermark  # this chunk reads above it
        resolved: set[int] = set()  # seen finished, read from below their bound
        while True:
            pending = list(self.in_progress)
            own = list(self._own)
            rows = yield self.pool.runQuery(
                self.sql.catch_up,
                {
                    "after": after,
                    "read": self.read_through,
                    "pending": [str(x) for x in pending],
                    "bounds": [self.in_progress[x] for x in pending],
                    "own": [str(x) for x in own],
                    "limit": self.chunk,
                },
            )
            if self._closed:
                return
            running, top, pruned_through = rows[0][:3]
            if pruned_through > self.watermark:
                yield self._reload(self.watermark, pruned_through)
                after, resolved = self.watermark, set()
                continue
            changes = [row_change(*row[3:]) for row in rows if row[3] is not None]
            for change in changes:
                self.target.apply(change)
            self.changes += len(changes)
            running = {int(x) for x in running}
            for x in pending:
                if x not in running and after <= self.in_progress[x]:
                    resolved.add(x)  # finished: this snapshot has all of its rows above `after`
            for x in running:  # new since the last snapshot: their revisions are above it
                self.in_progress.setdefault(x, self.visible)
            self.visible = max(self.visible, top)
            if len(changes) < self.chunk:
                break
            after = changes[-1].revision  # the rest above it, in a later snapshot
        for x in resolved:
            del self.in_progress[x]
        self.read_through = max(self.read_through, top)
        # Everything up to `top` is in memory, except what the transactions
        # still in progress (or finished after their rows were passed) commit:
        # all of it above their bounds.
        self.watermark = max(self.watermark, min([top, *self.in_progress.values()]))
        for x in own:
            if self._own[x] <= self.read_through and x not in self.in_progress:
                del self._own[x]
        self.target.settled(self.watermark)

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
        self.watermark = self.read_through = self.visible = revision
        self.in_progress.clear()  # the snapshot began with no write in progress
        self.reloads += 1
        self.log.info(
            "reloaded {count} rows ({dropped} entries dropped) in {seconds:.2f}s; "
            "following from revision {revision}",
            count=count,
            dropped=dropped,
            seconds=self.reactor.seconds() - began,
            revision=revision,
        )
