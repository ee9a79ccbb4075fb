"""
The change feed: every change applied to this node's memory, once, in
revision order, for watchers (dache.web.watch) and blocking reads.

Sources (each a small hook): the committer (this node's own writes), the
FollowedCache (other nodes' changes read from the table) and the cache's
expiry sweep. Nothing else knows the feed exists.

Order. With one node (memory, disk engines) changes reach memory in revision
order, so they are released at once. With several nodes on one table
(`ordered=True`) this node's own write of revision 10 can reach memory before
another node's revision 9 has been read; so events are held until the
follower's watermark says every change up to them is in (`settle`), then
released in revision order. A revision at or below the last released one is
a duplicate (a catch-up reading back this node's own write) and is dropped.

History. The last released events are kept, bounded by count and bytes
(WATCH_HISTORY, WATCH_HISTORY_BYTES), so a watcher resuming from revision r
gets every change after r exactly, as long as r >= `floor` (the revision
before the oldest event kept). Older than that, the caller must reset the
watcher (or, with PostgreSQL, replay from the table).

Expiry. Each node reports an expiry when its own sweep drops the entry
(`expire` events): live only, never kept in the history and carrying no
revision of their own (the expired entry's revision is in the data), since
an expiry is not a committed change.

Dispatch: subscribers are indexed by prefix, and a change is looked up under
each distinct prefix length in use (key[:n] in a dict), so its cost grows
with the number of different prefix lengths, not with the number of watchers
(dache.web.fanout subscribes once per prefix, for all of its streams).
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from typing import Any

from dache.engines import SET, Change
from dache.rendering import render_json, render_key
from dache.store.cache import revision_of

EVENT_SET = "set"
EVENT_DELETE = "delete"
EVENT_EXPIRE = "expire"
EVENT_OVERHEAD = 96  # bytes an event costs besides its key and value (history accounting)


class Event:
    """One change as watchers see it; its SSE text is rendered once, for everyone."""

    __slots__ = ("kind", "key", "value_json", "expiry", "revision", "_sse")

    def __init__(
        self,
        kind: str,
        key: str,
        revision: int,
        value_json: bytes | None = None,
        expiry: float | None = None,
    ):
        self.kind = kind
        self.key = key
        self.revision = revision
        self.value_json = value_json
        self.expiry = expiry
        self._sse: bytes | None = None

    @classmethod
    def from_change(cls, change: Change) -> Event:
        if change.kind == SET:
            return cls(EVENT_SET, change.key, change.revision, change.value_json, change.expiry)
        return cls(EVENT_DELETE, change.key, change.revision)

    @property
    def size(self) -> int:
        return EVENT_OVERHEAD + len(self.key) + len(self.value_json or b"")

    def data(self) -> bytes:
        """The event's JSON: {"key", "value"?, "expiry"?, "revision"}."""
        parts = [b'{"key":', render_key(self.key)]
        if self.value_json is not None:
            parts += [b',"value":', self.value_json]
        if self.expiry is not None:
            parts += [b',"expiry":', render_json(self.expiry)]
        parts.append(b',"revision":%d}' % self.revision)
        return b"".join(parts)

    def sse(self) -> bytes:
        """
        The event in text/event-stream framing. An expiry has no `id:` line: it
        is not a committed change, so it must not move a client's resume point.
        """
        if self._sse is None:
            head = b"" if self.kind == EVENT_EXPIRE else b"id: %d\n" % self.revision
            # A value's JSON text may hold line breaks (between tokens): each
            # line is a data: line, which the client joins back with "\n".
            lines = self.data().replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
            data = b"".join(b"data: " + line + b"\n" for line in lines)
            self._sse = head + b"event: " + self.kind.encode("ascii") + b"\n" + data + b"\n"
        return self._sse


Subscriber = Callable[[Event], None]


class ChangeFeed:
    """Released events, a bounded history of them, and prefix-indexed subscribers."""

    def __init__(
        self,
        history_count: int = 10_000,
        history_bytes: int = 16 * 1024 * 1024,
        revision: int = 0,
        ordered: bool = False,
    ):
        self.history_count = history_count
        self.history_bytes = history_bytes
        self.revision = revision  # the last revision released
        self.floor = revision  # replay is exact from any revision >= floor
        self.ordered = ordered
        self.settled = 0 if ordered else -1  # ordered: released up to here
        self._history: deque[Event] = deque()
        self._held_bytes = 0
        self._pending: list[tuple[int, Event]] = []  # heap, ordered mode
        self._pending_revisions: set[int] = set()
        self._by_prefix: dict[str, dict[int, Subscriber]] = {}
        self._lengths: dict[int, int] = {}  # prefix length -> prefixes of that length
        self._key_waiters: dict[str, dict[int, Callable[[], None]]] = {}
        self._next_token = 0
        self.released = 0  # events released (counted once, however many watchers)
        self.on_reset: list[Callable[[int], None]] = []  # reset(revision): live watchers
        # older(since) -> Deferred[(through, [Event]) or None]: the engine's replay of
        # what is older than the history (PostgreSQL: rows and tombstones), or None.
        self.older: Callable[[int], Any] | None = None

    # -- sources

    def offer(self, change: Change) -> None:
        """A committed change that reached memory (or was left out as older)."""
        if change.revision <= self.revision:
            return  # a duplicate: already released
        event = Event.from_change(change)
        if not self.ordered:
            self._release(event)
            return
        if event.revision <= self.settled and not self._pending:
            self._release(event)
            return
        if event.revision in self._pending_revisions:
            return
        self._pending_revisions.add(event.revision)
        heapq.heappush(self._pending, (event.revision, event))
        self.settle(self.settled)

    def settle(self, through: int) -> None:
        """Every change up to `through` has been offered: release them, in order."""
        if through > self.settled:
            self.settled = through
        pending = self._pending
        while pending and pending[0][0] <= self.settled:
            revision, event = heapq.heappop(pending)
            self._pending_revisions.discard(revision)
            if revision > self.revision:
                self._release(event)

    def expired(self, key: str, revision: int) -> None:
        """This node's sweep dropped an expired entry: tell watchers, live only."""
        self._dispatch(Event(EVENT_EXPIRE, key, revision))

    def reset(self, revision: int) -> None:
        """Memory was reloaded wholesale: the history no longer says what changed."""
        self._history.clear()
        self._held_bytes = 0
        self.revision = max(self.revision, revision)
        self.floor = self.revision
        for reset in list(self.on_reset):
            reset(self.revision)

    # -- release, history

    def _release(self, event: Event) -> None:
        self.revision = event.revision
        self.released += 1
        history = self._history
        history.append(event)
        self._held_bytes += event.size
        while len(history) > self.history_count or (
            self._held_bytes > self.history_bytes and len(history) > 1
        ):
            dropped = history.popleft()
            self._held_bytes -= dropped.size
            self.floor = dropped.revision
        self._dispatch(event)

    def replay(self, since: int, prefix: str = "") -> list[Event] | None:
        """Every kept event after `since` whose key starts with prefix; None: too old."""
        if since < self.floor:
            return None
        history = self._history
        if not history or history[-1].revision <= since:
            return []
        # Events are in revision order: walk back to the first one after `since`.
        start = len(history)
        while start > 0 and history[start - 1].revision > since:
            start -= 1
        return [e for e in list(history)[start:] if e.key.startswith(prefix)]

    @property
    def history_size(self) -> int:
        return len(self._history)

    @property
    def history_held_bytes(self) -> int:
        return self._held_bytes

    # -- subscribers

    def subscribe(self, prefix: str, subscriber: Subscriber) -> int:
        """Call subscriber(event) for every later event of a key starting with prefix."""
        token = self._token()
        group = self._by_prefix.get(prefix)
        if group is None:
            group = self._by_prefix[prefix] = {}
            self._lengths[len(prefix)] = self._lengths.get(len(prefix), 0) + 1
        group[token] = subscriber
        return token

    def unsubscribe(self, prefix: str, token: int) -> None:
        group = self._by_prefix.get(prefix)
        if group is None or group.pop(token, None) is None:
            return
        if not group:
            del self._by_prefix[prefix]
            left = self._lengths[len(prefix)] - 1
            if left:
                self._lengths[len(prefix)] = left
            else:
                del self._lengths[len(prefix)]

    def wait_for_key(self, key: str, wake: Callable[[], None]) -> int:
        """Call wake() once, at the next change of exactly this key."""
        token = self._token()
        self._key_waiters.setdefault(key, {})[token] = wake
        return token

    def stop_waiting(self, key: str, token: int) -> None:
        waiters = self._key_waiters.get(key)
        if waiters is not None:
            waiters.pop(token, None)
            if not waiters:
                del self._key_waiters[key]

    @property
    def subscribers(self) -> int:
        return sum(len(group) for group in self._by_prefix.values())

    def _token(self) -> int:
        self._next_token += 1
        return self._next_token

    def _dispatch(self, event: Event) -> None:
        key = event.key
        if self._key_waiters:
            waiters = self._key_waiters.pop(key, None)
            if waiters:
                for wake in list(waiters.values()):
                    wake()
        if not self._lengths:
            return
        by_prefix = self._by_prefix
        for length in list(self._lengths):
            if length > len(key):
                continue
            group = by_prefix.get(key[:length])
            if group:
                for subscriber in list(group.values()):
                    subscriber(event)


def publish_expiries(feed: ChangeFeed) -> Callable[[str, Any], None]:
    """The cache's on_expire hook: report each swept entry to the feed."""

    def expired(key: str, entry: Any) -> None:
        feed.expired(key, revision_of(entry))

    return expired
