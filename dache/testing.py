"""
Drive a dache node in memory, without sockets (in the manner of
treq.testing.StubTreq): for tests, and for anyone embedding dache.

    node = MemoryNode()                       # memory engine, a task.Clock
    response = yield node.http.post(node.url("k"), json={"value": 1})
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from treq.testing import StubTreq
from twisted.internet.task import Clock

from dache.engines import Engine
from dache.engines.memory import MemoryEngine
from dache.store.cache import Cache
from dache.store.committer import Committer
from dache.store.eviction import MemoryBound
from dache.web.api import DacheAPI
from dache.web.watch import attach as attach_watch

BASE = "http://dache.test"


def key_url(key: str, base: str = BASE) -> str:
    """The URL of a key, percent-encoded so '/', '%' and spaces round-trip."""
    return f"{base}/dache/{quote(key, safe='')}"


class MemoryNode:
    """A cache, committer and API around an engine, with a treq-like `http` client."""

    def __init__(
        self,
        engine: Engine | None = None,
        clock: Any = None,
        write_timeout: float = 2.0,
        max_memory: int = 0,
        eviction_policy: str = "noeviction",
        **api_options: Any,
    ):
        self.clock = clock if clock is not None else Clock()
        if clock is None:
            self.clock.advance(1_700_000_000)  # a realistic "now" for expiry tests
        self.engine = engine if engine is not None else MemoryEngine()
        self.cache = Cache()
        self.bound = MemoryBound(self.cache, max_memory, eviction_policy)
        self.committer = Committer(
            self.engine, self.cache, self.clock, write_timeout, bound=self.bound
        )
        self.api = DacheAPI(self.cache, self.committer, self.clock, **api_options)
        self.watchers = attach_watch(self.api, self.committer, self.cache, self.clock)
        self.http = StubTreq(self.api.resource())

    @staticmethod
    def url(key: str) -> str:
        return key_url(key)
