"""
The durability engine interface, and the registry of engines by name.

An engine makes batches of changes durable. It knows nothing of HTTP; the API
knows nothing of SQL or files. Every method returns a Deferred:

    load(apply)     -> Deferred[None]   calls apply(change) for the engine's
                                        live content, oldest first, then fires
    write(changes)  -> Deferred[None]   the batch is durable when it fires; the
                                        engine may set change.revision
    check()         -> Deferred[EngineHealth]   a real round trip, bounded
    close()         -> Deferred[None]

`load` streams into a callback rather than returning an iterable so a large
engine never holds its whole content twice. A failed write must leave the
engine's content as it was before the batch (all or nothing), and errback
with EngineUnavailable carrying a message fit for a client (no secrets).

Optional: subscribe(callback) for engines that see other nodes' changes;
attach(cache), called after load, for engines that read the live entries
(the disk engine's compaction); a `revision` attribute, the highest revision
the engine holds after load (deletes included), which the committer goes on
from.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.defer import Deferred

if TYPE_CHECKING:
    from dache.config import Config

SET = "set"
DELETE = "delete"


class Change:
    """One set or delete, as the committer hands it to an engine."""

    __slots__ = ("kind", "key", "value_json", "expiry", "revision")

    def __init__(
        self,
        kind: str,
        key: str,
        value_json: bytes | None = None,
        expiry: float | None = None,
        revision: int = 0,
    ):
        self.kind = kind
        self.key = key
        self.value_json = value_json
        self.expiry = expiry
        self.revision = revision

    @classmethod
    def set(cls, key: str, value_json: bytes, expiry: float | None = None) -> Change:
        return cls(SET, key, value_json, expiry)

    @classmethod
    def delete(cls, key: str) -> Change:
        return cls(DELETE, key)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Change):
            return NotImplemented
        return all(getattr(self, a) == getattr(other, a) for a in self.__slots__)

    def __repr__(self) -> str:
        return (
            f"Change({self.kind!r}, {self.key!r}, {self.value_json!r}, "
            f"expiry={self.expiry!r}, revision={self.revision!r})"
        )


class EngineUnavailable(Exception):
    """The engine could not make a batch durable; str() is safe to show a client."""


@dataclass
class EngineHealth:
    ok: bool
    detail: str = ""  # for a person; never a secret
    extra: dict[str, Any] = field(default_factory=dict)


class Engine(Protocol):
    name: str

    def load(self, apply: Callable[[Change], None]) -> Deferred[None]: ...

    def write(self, changes: list[Change]) -> Deferred[None]: ...

    def check(self) -> Deferred[EngineHealth]: ...

    def close(self) -> Deferred[None]: ...


# name -> "module:Class"; each class has from_config(config, reactor).
REGISTRY = {
    "memory": "dache.engines.memory:MemoryEngine",
    "disk": "dache.engines.disk:DiskEngine",
}


def create_engine(config: Config, reactor: Any) -> Engine:
    name = config.durability_engine
    module_name, _, class_name = REGISTRY[name].partition(":")
    engine_class = getattr(importlib.import_module(module_name), class_name)
    return engine_class.from_config(config, reactor)
