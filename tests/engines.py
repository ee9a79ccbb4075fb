"""
Engines for unit tests of the committer and API: the memory engine with its
writes held or failed on demand. (They stand in for *an* engine to drive the
committer's state machine; the real engines have their own tests against a
real PostgreSQL and a real file system.)
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail

from dache.engines import Change, EngineUnavailable
from dache.engines.memory import MemoryEngine


class HeldEngine(MemoryEngine):
    """Each write waits until the test fires it: `release()` or `fail_next()`."""

    name = "held"

    def __init__(self) -> None:
        self.writes: list[tuple[list[Change], Deferred[None]]] = []
        self.down: str | None = None
        self.arrived: Deferred[None] = Deferred()  # fires at the first write

    def write(self, changes: list[Change]) -> Deferred[None]:
        if self.down is not None:
            return fail(EngineUnavailable(self.down))
        d: Deferred[None] = Deferred()
        self.writes.append((list(changes), d))
        if not self.arrived.called:
            self.arrived.callback(None)
        return d

    def release(self, index: int = 0) -> list[Change]:
        changes, d = self.writes.pop(index)
        d.callback(None)
        return changes

    def refuse(self, message: str = "engine is down", index: int = 0) -> list[Change]:
        changes, d = self.writes.pop(index)
        d.errback(EngineUnavailable(message))
        return changes


class FailingEngine(MemoryEngine):
    """Succeeds until `down` is set to a message; then every write fails with it."""

    name = "failing"

    def __init__(self) -> None:
        self.down: str | None = None
        self.written: list[Change] = []

    def write(self, changes: list[Change]) -> Deferred[None]:
        if self.down is not None:
            return fail(EngineUnavailable(self.down))
        self.written.extend(changes)
        return super().write(changes)
