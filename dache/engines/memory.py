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

    # Nothing to write: the committer applies a batch without calling write()
    # (its Deferred, made, fired and called back, costs more than the rest of
    # a write). A subclass that overrides write() is called as any engine is.
    write.writes_nothing = True  # type: ignore[attr-defined]

    def check(self) -> Deferred[EngineHealth]:
        return succeed(EngineHealth(ok=True, detail="in memory, not durable"))

    def close(self) -> Deferred[None]:
        return succeed(None)
