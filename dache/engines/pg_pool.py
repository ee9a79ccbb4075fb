"""
A txpostgres connection pool that survives PostgreSQL going away.

txpostgres' ConnectionPool never reconnects, and a txpostgres Connection only
does with a DeadConnectionDetector of its own; so every pooled connection here
gets one (through the pool's connectionFactory). What this module adds:

- A connection that dies while idle reports it to its detector quietly: the
  reactor would otherwise log an "Unhandled Error" traceback for the failed
  poll, and a mere end-of-file would not even count as death.
- Reconnection with a short capped backoff (PostgreSQL back => writes back
  within a couple of seconds), every attempt bounded in time (libpq does not
  enforce connect_timeout on asynchronous connections), stoppable on close.
- Queries go to a live connection when there is one; when every connection is
  dead they fail at once with ConnectionDead instead of waiting.
- No Deferred handed out is txpostgres' own, so a caller's cancel never
  reaches txpostgres (which cannot cancel cleanly).
- Statements to PREPARE (`prepare()`) are prepared on every connection, and
  again on each reconnection before it serves.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

from twisted.internet import error as twisted_error
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    FirstError,
    fail,
    inlineCallbacks,
    maybeDeferred,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres import txpostgres
from txpostgres.psycopg2_impl import psycopg2
from txpostgres.reconnection import ConnectionDead, DeadConnectionDetector

# Connection-level failures: the connection is gone (or the statement's fate is unknown).
CONNECTION_ERRORS = (
    psycopg2.OperationalError,
    psycopg2.InterfaceError,
    txpostgres.RollbackFailed,
    twisted_error.ConnectionDone,
    twisted_error.ConnectionLost,
)


class ConnectTimeout(Exception):
    """A connection attempt got no answer in time."""


def backoff(first: float = 0.2, factor: float = 2.0, cap: float = 2.0) -> Iterator[float]:
    """Delays between attempts: short, growing, capped, jittered (no thundering herd)."""
    delay = first
    while True:
        yield delay * random.uniform(0.8, 1.2)
        delay = min(delay * factor, cap)


def describe(failure_or_error: Failure | BaseException) -> str:
    """A failure as one line, for logs and error messages (libpq never includes the password)."""
    error = failure_or_error.value if isinstance(failure_or_error, Failure) else failure_or_error
    if isinstance(error, ConnectionDead):
        return "connection is down, reconnecting"
    text = " ".join(str(error).split()) or type(error).__name__
    return text


def shield(d: Deferred[Any]) -> Deferred[Any]:
    """A Deferred with d's result; cancelling it leaves d (and txpostgres) alone."""
    out: Deferred[Any] = Deferred()

    def relay(result: Any) -> None:
        if not out.called:
            if isinstance(result, Failure):
                out.errback(result)
            else:
                out.callback(result)
        # else: the caller cancelled and left; the result (or failure) is dropped.

    d.addBoth(relay)
    return out


class Reconnector(DeadConnectionDetector):
    """
    A DeadConnectionDetector with a stoppable reconnection loop of its own
    (txpostgres' RetryingCall can only be stopped by cancelling an attempt in
    progress, and cancelling a txpostgres connect raises _CancelInProgress).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        on_death: Callable[[Failure], None],
        on_recovery: Callable[[], None],
        delays: Callable[[], Iterator[float]] = backoff,
    ):
        super().__init__(deathChecker=self._is_death, reconnectionIterator=delays, reactor=reactor)
        self.on_death = on_death
        self.on_recovery = on_recovery
        self.armed = False  # set once the pool's first connect succeeded
        self.stopped = False
        self.attempts = 0
        self._delays: Iterator[float] = iter(())
        self._timer: Any = None

    def _is_death(self, f: Failure) -> bool:
        if f.check(twisted_error.ConnectionDone, twisted_error.ConnectionLost):
            return True
        if f.check(txpostgres.RollbackFailed):
            return True  # a transaction may be left open: start afresh
        if f.check(psycopg2.OperationalError, psycopg2.InterfaceError):
            # Not every OperationalError kills a connection (a deadlock doesn't);
            # psycopg2 marks the connection closed when one did.
            connection = getattr(self.reconnectable, "_connection", None)
            return connection is None or connection.closed != 0
        return False

    def startReconnecting(self, f: Failure) -> None:
        # checkForDeadConnection calls this once per death.
        if self.stopped:
            return
        self.on_death(f)
        self._delays = iter(self.reconnectionIterator())
        self._schedule()

    def _schedule(self) -> None:
        if not self.stopped:
            self._timer = self.reactor.callLater(next(self._delays), self._attempt)

    def _attempt(self) -> None:
        self._timer = None
        self.attempts += 1
        d = maybeDeferred(self.reconnect)
        d.addCallbacks(self._reconnected, lambda _: self._schedule())
        d.addErrback(lambda f: self.log.failure("reconnecting to PostgreSQL failed", f))

    def _reconnected(self, _: object) -> None:
        if self.stopped:
            self.reconnectable.close()
            return
        self.connectionIsDead = False
        self.on_recovery()

    def stop(self) -> None:
        self.stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


def one_per_host(conninfo: dict[str, Any]) -> list[dict[str, Any]]:
    """A conninfo per host of a multi-host one (`host=a,b port=p1,p2`), in order."""
    hosts = str(conninfo.get("host", "")).split(",")
    if len(hosts) == 1:
        return [conninfo]
    ports = str(conninfo.get("port", "")).split(",")
    ports = ports * len(hosts) if len(ports) == 1 else ports
    return [{**conninfo, "host": h, "port": p} for h, p in zip(hosts, ports, strict=True)]


class PooledConnection(txpostgres.Connection):
    """A txpostgres Connection whose death goes to its detector, never to the log."""

    def __init__(
        self,
        reactor: Any,
        cooperator: Any,
        detector: Reconnector,
        connect_timeout: float,
        prepared: list[str] | None = None,
    ):
        super().__init__(reactor=reactor, cooperator=cooperator, detector=detector)
        self.connect_timeout = connect_timeout
        self.prepared = prepared if prepared is not None else []  # the pool's, shared
        self._closing = False

    @property
    def alive(self) -> bool:
        return (
            not self.detector.connectionIsDead
            and self._connection is not None
            and not self._connection.closed
        )

    def connect(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        places = one_per_host(kwargs)
        if len(places) == 1:
            return self._connect_one(*args, **kwargs)
        return self._connect_first(args, kwargs, places)

    @inlineCallbacks
    def _connect_first(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], places: list[dict[str, Any]]
    ) -> Any:
        """
        Several hosts (a primary and its standbys): each in turn, the first that
        takes us (with target_session_attrs=read-write: that accepts writes).
        libpq could do this itself, but an asynchronous multi-host connection
        moves to a new socket for each host, under the reactor's registration.
        """
        failures = []
        for place in places:
            if self._connection is not None and failures:
                try:  # the previous host's failed connection (as the detector does)
                    self.close()
                except Exception:  # noqa: BLE001, S110 - it may be half open: nothing to undo
                    pass
            try:
                result = yield self._connect_one(*args, **place)
            except Exception as e:  # noqa: BLE001 - the next host, then the failures named
                failures.append(f"{place['host']}:{place['port']}: {describe(e)}")
                continue
            finally:
                # A reconnect starts from the first host again.
                self.detector.setReconnectable(self, *args, **kwargs)
            return result
        raise psycopg2.OperationalError("; ".join(failures))

    def _connect_one(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        d = super().connect(*args, **kwargs)
        if d.called:
            return d
        state = {"timed_out": False}

        def give_up() -> None:
            state["timed_out"] = True
            self.close()  # errbacks the connect with ConnectionDone

        timer = self.reactor.callLater(self.connect_timeout, give_up)

        def done(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            if state["timed_out"] and isinstance(result, Failure):
                return Failure(ConnectTimeout(f"no answer within {self.connect_timeout:g}s"))
            return result

        return d.addBoth(done).addCallback(lambda _: self.prepare(self.prepared))

    @inlineCallbacks
    def prepare(self, statements: list[str]) -> Any:
        """PREPARE statements on this connection (named statements live per session)."""
        for statement in statements:
            # Past the detector: while reconnecting, the connection still counts as dead.
            yield self.lock.run(self._runOperation, statement)
        return self

    def close(self) -> None:
        if self._connection is None:
            return
        self._closing = True
        try:
            super().close()
        finally:
            self._closing = False

    def doRead(self) -> Any:
        # txpostgres' doRead, except that a connection whose server went away
        # while it was idle is handed back to the reactor as the disconnect
        # reason (so connectionLost tells the detector) instead of raising,
        # which the reactor would log as an "Unhandled Error" traceback.
        self.reactor.removeReader(self)
        connection = self._connection
        if connection is None or connection.closed:
            return None
        connecting = self._pollingD is not None  # then the connect's Deferred reports errors
        try:
            self.continuePolling()
        except psycopg2.Error as e:
            return e
        if connection.closed or connection.fileno() < 0:  # libpq dropped the socket
            return None if connecting else twisted_error.ConnectionLost("PostgreSQL went away")
        self.checkForNotifies()
        self.reactor.addReader(self)
        return None

    def doWrite(self) -> Any:
        try:
            return super().doWrite()
        except psycopg2.Error as e:
            return e

    def connectionLost(self, reason: Failure) -> None:
        connecting = self._pollingD is not None  # then the connect's Deferred has the error
        txpostgres._PollingMixin.connectionLost(self, reason)
        if self.detector.armed and not self._closing and not connecting:
            self.detector.checkForDeadConnection(reason)

    def _runInteraction(self, interaction: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        # As txpostgres', minus the log.err of a failed rollback: when the
        # connection died mid-transaction the rollback fails too, and the
        # original failure is what the caller needs.
        cursor = self.cursor()
        d = cursor.execute("begin")
        d.addCallback(interaction, *args, **kwargs)

        def commit(result: Any) -> Deferred[Any]:
            return cursor.execute("commit").addCallback(lambda _: result)

        def rollback(failure: Failure) -> Deferred[Any]:
            d = maybeDeferred(cursor.execute, "rollback")
            d.addErrback(lambda _: None)
            return d.addCallback(lambda _: failure)

        d.addCallback(commit)
        d.addErrback(rollback)
        return d


class ReconnectingPool(txpostgres.ConnectionPool):
    """
    A ConnectionPool of PooledConnections. `connect()` opens them all (or
    fails, closing them); afterwards each reconnects on its own.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        size: int,
        connect_timeout: float,
        on_death: Callable[[PooledConnection, Failure], None],
        on_recovery: Callable[[PooledConnection], None],
        **conninfo: Any,
    ):
        self.reactor = reactor
        self.connect_timeout = connect_timeout
        self._on_death = on_death
        self._on_recovery = on_recovery
        self.prepared: list[str] = []  # set by prepare(); every connection shares it
        super().__init__(None, min=size, **conninfo)
        self.everyone = frozenset(self.connections)  # idle or busy

    def connectionFactory(self, reactor: Any, cooperator: Any) -> PooledConnection:
        detector = Reconnector(
            reactor,
            on_death=lambda f: self._on_death(connection, f),
            on_recovery=lambda: self._on_recovery(connection),
        )
        connection = PooledConnection(
            reactor, cooperator, detector, self.connect_timeout, self.prepared
        )
        return connection

    def prepare(self, statements: list[str]) -> Deferred[Any]:
        """PREPARE statements on every connection now, and on each one that reconnects."""
        self.prepared[:] = statements
        return DeferredList(
            [shield(c.prepare(statements)) for c in self.everyone if c.alive],
            fireOnOneErrback=True,
            consumeErrors=True,
        ).addErrback(lambda f: f.value.subFailure if f.check(FirstError) else f)

    @property
    def alive(self) -> int:
        return sum(1 for c in self.everyone if c.alive)

    def connect(self) -> Deferred[None]:
        attempts = [shield(c.connect(*self.connargs, **self.connkw)) for c in self.everyone]
        d = DeferredList(attempts, fireOnOneErrback=True, consumeErrors=True)

        def failed(f: Failure) -> Failure:
            self.disconnect()
            if f.check(FirstError):
                return f.value.subFailure  # the connection's own failure
            return f

        def connected(_: object) -> None:
            for c in self.everyone:
                c.detector.armed = True  # from now on, each reconnects on its own

        return d.addCallbacks(connected, failed)

    def disconnect(self) -> None:
        for c in self.everyone:
            c.close()

    def close(self) -> None:
        for c in self.everyone:
            c.detector.stop()
        self.disconnect()

    def _checkout(self) -> PooledConnection:
        # Prefer a live connection; a dead one fails the call at once (ConnectionDead).
        live = [c for c in self.connections if c.alive]
        connection = live[0] if live else next(iter(self.connections))
        self.connections.remove(connection)
        return connection

    def _runQuery(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        c = self._checkout()
        return c.runQuery(*args, **kwargs).addBoth(self._putBackAndPassthrough, c)

    def _runOperation(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        c = self._checkout()
        return c.runOperation(*args, **kwargs).addBoth(self._putBackAndPassthrough, c)

    def _runInteraction(self, interaction: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        c = self._checkout()
        d = c.runInteraction(interaction, *args, **kwargs)
        return d.addBoth(self._putBackAndPassthrough, c)

    def runQuery(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        if not self.connections and not self.alive:
            return fail(ConnectionDead())
        return shield(super().runQuery(*args, **kwargs))

    def runOperation(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        return shield(super().runOperation(*args, **kwargs))

    def runInteraction(self, interaction: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        return shield(super().runInteraction(interaction, *args, **kwargs))
