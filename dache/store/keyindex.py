"""
The cache's keys in code-point order (Python's str order), for listing by
prefix and deleting a prefix: a sortedcontainers.SortedList, so finding where
a prefix starts is O(log n) and a page is O(log n + page), never a scan of the
map. The cache keeps it in step from its two mutation points (set of a new
key, delete), which every other path (own writes, followed changes, expiry
sweeps, reloads, evictions) goes through.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from sortedcontainers import SortedList


def successor(prefix: str) -> str | None:
    """The least string greater than every string that starts with prefix (None: no bound)."""
    while prefix:
        last = ord(prefix[-1])
        if last < 0x10FFFF:
            return prefix[:-1] + chr(last + 1)
        prefix = prefix[:-1]
    return None


class KeyIndex:
    """Keys, sorted; add and discard are O(log n)."""

    __slots__ = ("_keys",)

    def __init__(self, keys: Iterable[str] = ()):
        self._keys = SortedList(keys)  # one sort, not n inserts

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def add(self, key: str) -> None:
        self._keys.add(key)

    def discard(self, key: str) -> None:
        self._keys.discard(key)

    def starting_with(self, prefix: str, after: str | None = None) -> Iterator[str]:
        """Keys that start with prefix, in order, from after (exclusive) on."""
        keys = self._keys
        if after is not None and after >= prefix:
            start = keys.bisect_right(after)
        else:
            start = keys.bisect_left(prefix)
        bound = successor(prefix)
        stop = len(keys) if bound is None else keys.bisect_left(bound)
        return keys.islice(start, stop)

    def count(self, prefix: str) -> int:
        """How many keys start with prefix: O(log n)."""
        keys = self._keys
        bound = successor(prefix)
        stop = len(keys) if bound is None else keys.bisect_left(bound)
        return max(0, stop - keys.bisect_left(prefix))
