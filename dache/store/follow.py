"""
The memory side of following other nodes: their committed changes are applied
to this node's cache without ever going back.

Several nodes share one table (see dache.engines.pg_follow for how a node
learns of the others' changes). A change read from the table can reach memory
after a later state of the same key already has: this node's own write that
was acknowledged meanwhile, or a catch-up that ran while an older read was in
flight. So every change is applied by revision, never blindly:

- a set applies only if its revision is above the entry held and above any
  remembered delete of the key;
- a delete applies only if its revision is above the entry held;
- deletes (own and followed) are remembered until the engine says no change
  older than them can arrive any more (`settled`), because a set read before
  the delete committed would otherwise bring the key back.

A node away for longer than the engine keeps tombstones reloads everything:
`reloading()` applies the table's rows the same way, then drops the entries
the table no longer has, unless they are newer than the reload's snapshot.
"""

from __future__ import annotations

from typing import Any

from dache.engines import SET, Change
from dache.store.cache import Cache, revision_of


class FollowedCache:
    """What an engine that follows other nodes hands their changes to."""

    def __init__(self, cache: Cache, clock: Any):
        self.cache = cache
        self.clock = clock
        cache.remember_deletes()
        self.applied = 0  # changes applied (not left out as older)
        self.left_out = 0  # changes older than what memory held
        self.feed: Any = None  # a dache.store.changes.ChangeFeed, or None

    def apply(self, change: Change) -> bool:
        """Apply a committed change unless memory holds a later state; False if left out."""
        cache = self.cache
        if change.kind == SET and (change.expiry is None or change.expiry > self.clock.seconds()):
            assert change.value_json is not None
            done = cache.apply_set(change.key, change.value_json, change.expiry, change.revision)
            applied = done is not None
        else:  # a delete, or a set that has already expired by this node's clock
            applied = cache.apply_delete(change.key, change.revision)
        if applied:
            self.applied += 1
        else:
            self.left_out += 1
        if self.feed is not None:  # committed either way: watchers see it in order
            self.feed.offer(change)
        return applied

    def settled(self, through: int) -> None:
        """No change of revision <= through can arrive any more: forget those deletes."""
        self.cache.forget_deletes(through)
        self.advanced(through)

    def advanced(self, through: int) -> None:
        """Every change up to `through` is in memory (the follower's watermark)."""
        if self.feed is not None:
            self.feed.settle(through)

    def reloading(self) -> Reload:
        return Reload(self, self.feed)


class Reload:
    """A full reload: apply every row of a snapshot, then drop what it no longer has."""

    def __init__(self, followed: FollowedCache, feed: Any = None):
        self.followed = followed
        self.feed = feed  # told once the reload is done: its history has a gap
        self.seen: set[str] = set()

    def apply(self, change: Change) -> None:
        self.seen.add(change.key)
        feed, self.followed.feed = self.followed.feed, None  # a reload is no change stream
        try:
            self.followed.apply(change)
        finally:
            self.followed.feed = feed

    def finish(self, through: int) -> int:
        """
        The snapshot held every change up to revision `through`: an entry it did
        not have, of revision <= through, was deleted since. Answers how many
        entries were dropped.
        """
        cache, seen = self.followed.cache, self.seen
        gone = [k for k, e in cache.items() if k not in seen and revision_of(e) <= through]
        for key in gone:
            cache.delete(key)
        if self.feed is not None:
            self.feed.reset(through)
        self.followed.settled(through)
        return len(gone)
