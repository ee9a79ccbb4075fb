"""The memory engine: nothing is durable; every write succeeds at once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed

from dache.engines import Change, EngineHealth


class MemoryEngine:
    name = "memory"

    @classmethod
    def from_config(cls, config: Any, reactor: Any) -> MemoryEngine:
        return cls()

    def load(self, apply: Callable[[Change], None]) -> Deferred[None]:
        return succeed(None)

    def write(self, changes: list[Change]) -> Deferred[None]:
        return succeed(None)

    def check(self) -> Deferred[EngineHealth]:
        return succeed(EngineHealth(ok=True, detail="in memory, not durable"))

    def close(self) -> Deferred[None]:
        return succeed(None)
