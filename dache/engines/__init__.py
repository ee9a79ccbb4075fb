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

Optional: follow(target), called before load(), for engines shared by several
nodes: they hand target (a dache.store.follow.FollowedCache) every change committed
that this node did not apply itself (other nodes' changes, whatever a write of
unknown outcome did), and target applies it by revision, never going back.
And a static check_config(config) that raises ConfigError, which
`twistd dache` calls before start-up so a bad engine setting is one line.
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
# Decided in commit order against the key's current state (dache.engines.decide),
# then written as a SET or DELETE (UPDATE) or not written at all (GET).
GET = "get"
UPDATE = "update"


ANY = "*"  # a precondition on any current revision (HTTP's `If-Match: *`)


class Change:
    """
    One set or delete, as the committer hands it to an engine.

    Preconditions (from HTTP If-Match / If-None-Match): `if_match` is ANY or a
    tuple of revisions the key's live entry must have; `if_none_match` is ANY
    (the key must be absent) or a tuple of revisions it must not have. An
    engine that decides preconditions itself (`decides_preconditions = True`,
    e.g. inside a PostgreSQL transaction shared by several nodes) sets
    `rejected = True` on a change whose precondition failed, and `revision` to
    the key's current revision (0 when absent); otherwise the committer decides
    them against memory, in commit order.
    """

    __slots__ = (
        "kind",
        "key",
        "value_json",
        "expiry",
        "revision",
        "if_match",
        "if_none_match",
        "rejected",
        "update",
        "group",
        "error",
    )

    def __init__(
        self,
        kind: str,
        key: str,
        value_json: bytes | None = None,
        expiry: float | None = None,
        revision: int = 0,
        if_match: str | tuple[int, ...] | None = None,
        if_none_match: str | tuple[int, ...] | None = None,
    ):
        self.kind = kind
        self.key = key
        self.value_json = value_json
        self.expiry = expiry
        self.revision = revision
        self.if_match = if_match
        self.if_none_match = if_none_match
        self.rejected = False
        self.update: Any = None  # an UPDATE's dache.engines.decide.Update
        self.group: Any = None  # a dache.engines.decide.Group: all or nothing
        self.error: Exception | None = None  # why it was rejected (None: a precondition)

    @property
    def conditional(self) -> bool:
        return self.if_match is not None or self.if_none_match is not None

    @property
    def decided(self) -> bool:
        """Whether it must be decided in commit order (see dache.engines.decide)."""
        return (
            self.if_match is not None
            or self.if_none_match is not None
            or self.group is not None
            or self.kind == GET
            or self.kind == UPDATE
        )

    def precondition_holds(self, current_revision: int | None) -> bool:
        """Whether the precondition holds when the key's live revision is this (None: absent)."""
        if self.if_match is not None:
            if current_revision is None:
                return False
            if self.if_match != ANY and current_revision not in self.if_match:
                return False
        if self.if_none_match is not None and current_revision is not None:
            if self.if_none_match == ANY or current_revision in self.if_none_match:
                return False
        return True

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


class PreconditionFailed(Exception):
    """A conditional change whose precondition did not hold; nothing was written."""

    def __init__(self, current_revision: int | None):
        super().__init__(current_revision)
        self.current_revision = current_revision  # None: the key is absent


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
    "postgres": "dache.engines.postgres:PostgresEngine",
    "disk": "dache.engines.disk:DiskEngine",
}


def engine_class(name: str) -> Any:
    module_name, _, class_name = REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def create_engine(config: Config, reactor: Any) -> Engine:
    return engine_class(config.durability_engine).from_config(config, reactor)


def check_engine_config(config: Config) -> None:
    """Before start-up: the chosen engine's own settings, or ConfigError (one line)."""
    check = getattr(engine_class(config.durability_engine), "check_config", None)
    if check is not None:
        check(config)
