"""
Reading the key space in order: a page of live entries under a prefix, their
count, and the keys a range delete covers. Pure, like the cache: callers pass
`now`. Costs O(log n + page) through the cache's sorted index.
"""

from __future__ import annotations

from dache.store.cache import Cache, Entry

_SWEEP = 10_000  # Cache.expire's limit per call


def drop_expired(cache: Cache, now: float) -> None:
    """
    Remove every entry expired at `now` first (the sweeper's work, done early),
    so counts are exact and pages never walk over dead keys.
    """
    while cache.expire(now, _SWEEP) == _SWEEP:
        pass


def page(
    cache: Cache, prefix: str, after: str | None, limit: int, now: float
) -> tuple[list[tuple[str, Entry]], str | None]:
    """
    Up to `limit` live (key, entry) pairs whose key starts with prefix, after
    `after` (exclusive), in code-point order; and the key to continue after
    (None: nothing more).
    """
    drop_expired(cache, now)
    found: list[tuple[str, Entry]] = []
    for key in cache.index().starting_with(prefix, after):
        entry = cache.get(key, now)
        if entry is None:
            continue
        if len(found) == limit:
            return found, found[-1][0]
        found.append((key, entry))
    return found, None


def count(cache: Cache, prefix: str, now: float) -> int:
    drop_expired(cache, now)
    return cache.index().count(prefix)


def keys_under(cache: Cache, prefix: str, now: float) -> list[str]:
    drop_expired(cache, now)
    return list(cache.index().starting_with(prefix))
