"""
A test engine for the health state machine: the memory engine, wrapped so a
test can make it fail, hang, or count its round trips. Not a stand-in for
PostgreSQL or the disk: those are tested against the real thing.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred, fail, succeed

from dache.engines import Change, EngineHealth, EngineUnavailable
from dache.engines.memory import MemoryEngine


class SwitchableEngine:
    name = "switchable"

    def __init__(self) -> None:
        self.inner = MemoryEngine()
        self.error: str | None = None  # set: writes and checks fail with it
        self.hang = False  # set: checks wait for the test to fire them from `pending`
        self.pending: list[Deferred[EngineHealth]] = []
        self.crash: Exception | None = None  # set: check() raises it
        self.checks = 0  # round trips asked for

    def fail(self, error: str) -> None:
        self.error = error

    def recover(self) -> None:
        self.error = None
        self.hang = False
        self.crash = None

    def load(self, apply: Callable[[Change], None]) -> Deferred[None]:
        return self.inner.load(apply)

    def write(self, changes: list[Change]) -> Deferred[None]:
        if self.error is not None:
            return fail(EngineUnavailable(self.error))
        return self.inner.write(changes)

    def check(self) -> Deferred[EngineHealth]:
        self.checks += 1
        if self.crash is not None:
            raise self.crash
        if self.hang:
            d: Deferred[EngineHealth] = Deferred()
            self.pending.append(d)
            return d
        if self.error is not None:
            return succeed(EngineHealth(ok=False, detail=self.error))
        return self.inner.check()

    def close(self) -> Deferred[None]:
        return self.inner.close()
