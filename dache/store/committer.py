"""
Group commit: every set and delete goes through the Committer.

Changes queue while the engine is busy with the previous batch; when it is
free, everything queued goes to engine.write() as one batch (one transaction,
one fsync). Only when that write fires are the changes applied to the cache,
in submission order, and their requests answered. So there is one order, and
nothing is visible before it is durable.

A batch that fails is answered with EngineUnavailable (503) and leaves the
cache unchanged. A batch not confirmed within write_timeout is answered with
WriteTimeout; if it was already handed to the engine it stays in flight and is
applied if the engine later confirms it (the client was told the outcome is
unknown); if it was still queued it is dropped, never written.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from dache.engines import DELETE, GET, SET, Change, Engine, EngineUnavailable, PreconditionFailed
from dache.engines.decide import Group, State, decide
from dache.store.cache import Cache, expiry_of, revision_of, value_json_of
from dache.store.eviction import MemoryBound

SHUTTING_DOWN = "dache is shutting down; retry on another node"


class WriteTimeout(EngineUnavailable):
    """The engine did not confirm a write in time; it may or may not be durable."""


class ShuttingDown(EngineUnavailable):
    """dache is stopping and takes no new writes."""


class Waiter(Protocol):
    """
    Who submit_to() answers: callback(revision) once the change is durable and
    applied, or errback(failure). Called directly, unlike a Deferred's
    callbacks, so neither may raise.
    """

    def callback(self, revision: int) -> None: ...

    def errback(self, failure: Failure) -> None: ...


class _Batch:
    __slots__ = ("changes", "waiters", "timer", "answered", "in_flight")

    def __init__(self) -> None:
        self.changes: list[Change] = []
        self.waiters: list[Deferred[int] | Waiter] = []
        self.timer: Any = None
        self.answered = False
        self.in_flight = False


class Committer:
    log = Logger()

    def __init__(
        self,
        engine: Engine,
        cache: Cache,
        clock: Any,
        write_timeout: float = 2.0,
        revision: int = 0,
        bound: MemoryBound | None = None,
    ):
        self.engine = engine
        self.cache = cache
        self.clock = clock
        self.write_timeout = write_timeout
        self.revision = revision  # last revision handed out
        # MAX_MEMORY (dache.store.eviction): refusals and evictions, decided per batch.
        self.memory = bound  # for health and metrics, even when it has no limit
        self.bound = bound if bound is not None and bound.limit else None
        self._queued: _Batch | None = None
        self._in_flight: _Batch | None = None
        self._closing = False
        self._drained: list[Deferred[None]] = []
        # Observers, e.g. metrics: called with (batch size, seconds) / (error).
        self.on_batch: list[Callable[[int, float], None]] = []
        self.on_failure: list[Callable[[EngineUnavailable], None]] = []
        # Called with each change once it is in memory (the change feed).
        self.on_applied: list[Callable[[Change], None]] = []
        # Counters for health checks and tests.
        self.batches = 0
        self.changes = 0
        self.failures = 0
        self.last_error: str | None = None

    def submit(self, change: Change) -> Deferred[int]:
        """Queue a change; fires with its revision once durable and applied."""
        d: Deferred[int] = Deferred()
        self.submit_to(change, d)
        return d

    def submit_to(self, change: Change, answer: Waiter) -> None:
        """
        submit(), answered through `answer` rather than a Deferred: the HTTP
        hot path, where a Deferred's creation, firing and callback loop cost
        more than the memory engine's whole write.
        """
        if self._closing:
            answer.errback(Failure(ShuttingDown(SHUTTING_DOWN)))
            return
        self._queue(change, answer)

    def submit_group(self, group: Group) -> Deferred[Group]:
        """
        Queue a group's changes into one batch, adjacent: they are decided
        together (all or nothing) and made durable in one engine write. Fires
        with the group once applied; errback with the first member's failure.
        """
        d: Deferred[Group] = Deferred()
        if self._closing:
            d.errback(ShuttingDown(SHUTTING_DOWN))
            return d
        waiter = _GroupWaiter(group, d)
        batch = self._filling()
        batch.changes.extend(group.changes)
        batch.waiters.extend([waiter] * len(group.changes))
        if self._in_flight is None:
            self._flush()
        return d

    def _filling(self) -> _Batch:
        """The batch new changes join (the next one to be written), made when needed."""
        batch = self._queued
        if batch is None:
            batch = self._queued = _Batch()
            if self._in_flight is not None:  # it waits for the engine: bound that now
                self._start_timer(batch)
        return batch

    def _queue(self, change: Change, waiter: Deferred[int] | Waiter) -> None:
        batch = self._filling()
        batch.changes.append(change)
        batch.waiters.append(waiter)
        if self._in_flight is None:
            self._flush()

    @property
    def busy(self) -> bool:
        return self._in_flight is not None or self._queued is not None

    @property
    def closing(self) -> bool:
        """True once drain() was called: no new writes are taken."""
        return self._closing

    def drain(self) -> Deferred[None]:
        """Refuse new writes; fire when every queued and in-flight write is done."""
        self._closing = True
        if not self.busy:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._drained.append(d)
        return d

    def _flush(self) -> None:
        batch = self._queued
        if batch is None:
            return
        self._queued = None
        self._in_flight = batch
        batch.in_flight = True
        writes = batch.changes
        if not getattr(self.engine, "decides_preconditions", False) and any(
            change.decided for change in writes
        ):
            # Against memory as each change will find it (dache.engines.decide).
            writes = decide(writes, self._state, self.revision + 1, self.clock.seconds())
            self.revision += len(writes)
            self._answer_rejected(batch)  # at once: nothing it waits for
            if not writes:
                self._answer(batch)
                self._next()
                return
        else:
            for change in writes:
                self.revision += 1
                change.revision = self.revision
        if self.bound is not None:
            writes = self._admit(batch, writes)
            if not writes:
                self._answer(batch)
                self._next()
                return
        started = self.clock.seconds()
        if getattr(self.engine.write, "writes_nothing", False):  # the memory engine's
            self._written(None, batch, started)
            return
        d = maybeDeferred(self.engine.write, writes)
        if not d.called and batch.timer is None:
            # Only a write still pending needs a timer (the memory engine's
            # never is): a timer per write costs a DelayedCall and its cancel.
            self._start_timer(batch)
        d.addCallbacks(
            self._written, self._failed, callbackArgs=(batch, started), errbackArgs=(batch,)
        )

    def _start_timer(self, batch: _Batch) -> None:
        batch.timer = self.clock.callLater(self.write_timeout, self._timed_out, batch)

    @staticmethod
    def _stop_timer(batch: _Batch) -> None:
        if batch.timer is not None and batch.timer.active():
            batch.timer.cancel()

    def _admit(self, batch: _Batch, writes: list[Change]) -> list[Change]:
        """
        MAX_MEMORY (dache.store.eviction): refuse (507) what does not fit, or
        make room: eviction deletes join this batch. When that changed the
        batch, its writes get this batch's revisions again, in batch order.
        """
        bound = self.bound
        assert bound is not None
        bound.tick(self.clock.seconds())
        changes, waiters, changed = bound.admit(batch.changes, batch.waiters, batch.answered)
        if not changed:
            return writes
        first = writes[0].revision
        batch.changes, batch.waiters = changes, waiters
        writes = [change for change in changes if change.kind != GET]
        for number, change in enumerate(writes, first):
            change.revision = number
        self.revision = first + len(writes) - 1
        return writes

    def _answer_rejected(self, batch: _Batch) -> None:
        kept_changes, kept_waiters = [], []
        for change, waiter in zip(batch.changes, batch.waiters, strict=True):
            if change.rejected:
                waiter.errback(Failure(_rejection(change)))
            else:
                kept_changes.append(change)
                kept_waiters.append(waiter)
        batch.changes, batch.waiters = kept_changes, kept_waiters

    def _state(self, key: str) -> State:
        entry = self.cache.get(key, self.clock.seconds())
        if entry is None:
            return None
        return value_json_of(entry), expiry_of(entry), revision_of(entry)

    def _written(self, _: object, batch: _Batch, started: float) -> None:
        self._stop_timer(batch)
        cache, applied_hooks = self.cache, self.on_applied
        for change in batch.changes:
            if change.rejected:
                continue
            # apply_*: memory may already hold a later revision of the key,
            # applied from another node's change (see dache.store.follow).
            if change.kind == SET:
                cache.apply_set(change.key, change.value_json, change.expiry, change.revision)
            elif change.kind == DELETE:
                existed = change.key in cache  # a delete of nothing is no event
                cache.apply_delete(change.key, change.revision)
                if not existed:
                    continue
            else:
                continue  # a GET in a group is not a change
            for hook in applied_hooks:
                hook(change)
        applied = [c.revision for c in batch.changes if not c.rejected]
        if applied:
            self.revision = max(self.revision, *applied)
        self.batches += 1
        self.changes += len(batch.changes)
        self.last_error = None
        for observer in self.on_batch:
            observer(len(batch.changes), self.clock.seconds() - started)
        self._answer(batch)
        self._next()

    def _answer(self, batch: _Batch) -> None:
        if batch.answered:
            return
        batch.answered = True
        self._stop_timer(batch)
        for change, waiter in zip(batch.changes, batch.waiters, strict=True):
            if change.rejected:
                waiter.errback(Failure(_rejection(change)))
            else:
                waiter.callback(change.revision)

    def _failed(self, failure: Failure, batch: _Batch) -> None:
        self._stop_timer(batch)
        error = failure.value
        if not isinstance(error, EngineUnavailable):
            self.log.failure("durability engine failed a write unexpectedly", failure)
            error = EngineUnavailable("durability engine error; see the server log")
        self.failures += 1
        self.last_error = str(error)
        for observer in self.on_failure:
            observer(error)
        self._answer_error(batch, error)
        self._next()

    def _timed_out(self, batch: _Batch) -> None:
        if not batch.in_flight and self._queued is batch:
            self._queued = None  # never reached the engine: drop it
        self._answer_error(
            batch,
            WriteTimeout(
                f"durability engine did not confirm the write within {self.write_timeout:g}s"
            ),
        )
        if not self.busy:
            self._fire_drained()

    def _answer_error(self, batch: _Batch, error: EngineUnavailable) -> None:
        if batch.answered:
            return
        batch.answered = True
        for waiter in batch.waiters:
            waiter.errback(Failure(error))

    def _next(self) -> None:
        self._in_flight = None
        if self._queued is not None:
            self._flush()
        else:
            self._fire_drained()

    def _fire_drained(self) -> None:
        waiters, self._drained = self._drained, []
        for d in waiters:
            d.callback(None)


def _rejection(change: Change) -> Exception:
    """Why a change was rejected (dache.engines.decide): its error, or its precondition."""
    return change.error or PreconditionFailed(change.revision or None)


class _GroupWaiter:
    """Every member's waiter: answers the group once all of them are applied, or the first error."""

    __slots__ = ("group", "remaining", "answer")

    def __init__(self, group: Group, answer: Deferred[Group]):
        self.group = group
        self.remaining = len(group.changes)
        self.answer: Deferred[Group] | None = answer

    def callback(self, revision: int) -> None:
        self.remaining -= 1
        if self.remaining == 0 and self.answer is not None:
            answer, self.answer = self.answer, None
            answer.callback(self.group)

    def errback(self, failure: Failure) -> None:
        if self.answer is not None:
            answer, self.answer = self.answer, None
            answer.errback(failure)
