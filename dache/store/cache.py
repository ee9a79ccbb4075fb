"""
The in-memory map: entries, their expiry index and size accounting.

Pure: no I/O and no reactor. Callers pass `now` (unix seconds) explicitly, so
expiry is driven by whatever clock the service injects. An entry is one bytes
object, laid out as dache/entry.py says.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator

from dache.entry import (  # re-exported: the store's users read entries through here
    BODY_AT,
    EXPIRY_AT,
    EXPIRY_OFFSET,
    HAS_EXPIRY,
    Entry,
    body_length_of,
    body_of,
    etag_of,
    expiry_json_of,
    expiry_of,
    render_entry,
    revision_of,
    value_json_of,
    value_of,
)
from dache.rendering import render_key
from dache.store.keyindex import KeyIndex

__all__ = [
    "EXPIRY_AT",
    "EXPIRY_OFFSET",
    "Cache",
    "Entry",
    "body_length_of",
    "body_of",
    "etag_of",
    "expiry_json_of",
    "expiry_of",
    "render_entry",
    "revision_of",
    "value_json_of",
    "value_of",
]

# What an entry costs beyond its key's characters and its body (the GET
# body, see dache/entry.py): the key's str header, the entry's bytes header and its own header
# (ETag, offsets, expiry), the dict slot, malloc's rounding. Measured
# (CPython 3.11, 64-bit): RSS growth of a process filling a Cache with
# 300,000 entries, less their keys and bodies, per entry; see docs/DESIGN.md
# "Memory and eviction" for how to measure it again. An expiry adds its 8
# bytes here, a float, a tuple and a heap slot in the expiry heap.
ENTRY_OVERHEAD = 136
EXPIRY_OVERHEAD = 112
# Bodies this large get pages of their own under a memory bound (dache.mallocpolicy's
# MMAP_THRESHOLD): count them rounded up to whole pages, as RSS does.
MAPPED_BODY = 32 * 1024
PAGE = 4096
_MAPPED_HEADERS = 64  # the bytes object's and the entry's headers, malloc's own


def held(body_length: int) -> int:
    """The bytes a body of this length holds: itself, or its whole pages once mapped."""
    if body_length < MAPPED_BODY:
        return body_length
    return -(-(body_length + _MAPPED_HEADERS) // PAGE) * PAGE - _MAPPED_HEADERS


class Cache:
    """
    Keys to entries, with a heap of (expiry, key) so expired entries are
    dropped without being read. Heap items go stale when a key is overwritten
    or deleted; they are recognised on pop (the entry's expiry differs) and
    skipped, which keeps set and delete O(log n) at most.
    """

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}
        self._expiries: list[tuple[float, str]] = []
        self.bytes = 0  # approximate: keys + bodies
        self.with_expiry = 0  # entries that have an expiry (they cost more: see `used`)
        # key -> the eviction policy's one small int per key (dache.store.eviction),
        # kept only under an LRU / LFU policy (None: not kept); every set stores
        # `new_use`, which the policy keeps current.
        self.uses: dict[str, int] | None = None
        self.new_use = 0
        # Keys to sample from for allkeys-* eviction (dache.store.eviction):
        # appended when a key is new, removed lazily when sampled. None: not kept.
        self.sample_keys: list[str] | None = None
        self.entry_overhead = ENTRY_OVERHEAD  # + the policy's bookkeeping per key
        self.expired_total = 0  # entries removed because they expired
        # key -> revision of its latest delete, kept only while changes can
        # still arrive out of order (see remember_deletes); None: not kept.
        self._deleted: dict[str, int] | None = None
        self._deleted_heap: list[tuple[int, str]] = []
        # Called with (key, entry) for each entry expire() drops (the change feed).
        self.on_expire: Callable[[str, Entry], None] | None = None
        # The keys in order (dache.store.keyindex), built on first use by index();
        # set() and delete() keep it in step, so every mutation path does.
        self._index: KeyIndex | None = None
        self.revision = 0  # the highest revision applied
        # Bytes kept in `used` for copies of recent values held outside this map,
        # so that MAX_MEMORY bounds them too: the watch history's budget
        # (MemoryBound.reserve_history).
        self.reserved = 0

    def index(self) -> KeyIndex:
        """The sorted key index, built (one sort) the first time it is asked for."""
        if self._index is None:
            self._index = KeyIndex(self._entries)
        return self._index

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    @property
    def used(self) -> int:
        """
        Bytes the entries really take: keys and bodies, plus what each entry's
        objects cost beyond them (measured: see ENTRY_OVERHEAD).
        """
        return (
            self.bytes
            + self.entry_overhead * len(self._entries)
            + EXPIRY_OVERHEAD * self.with_expiry
            + self.reserved
        )

    def cost(self, key: str, body_length: int, has_expiry: bool) -> int:
        """What one entry adds to `used` (the committer's projection before a write)."""
        extra = self.entry_overhead + (EXPIRY_OVERHEAD if has_expiry else 0)
        return len(key) + held(body_length) + extra

    def entry_cost(self, key: str, entry: Entry) -> int:
        return self.cost(key, len(entry) - entry[0], entry[1] == 1)

    def get(self, key: str, now: float) -> Entry | None:
        """The live entry for key at `now`, or None (missing or expired)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[1] and EXPIRY_AT(entry, 7)[0] <= now:  # expiry_of inlined (7: EXPIRY_OFFSET)
            return None
        return entry

    def peek(self, key: str) -> Entry | None:
        """The entry as held, expired or not (for revision checks)."""
        return self._entries.get(key)

    def set(
        self,
        key: str,
        value_json: bytes,
        expiry: float | None = None,
        revision: int = 0,
        key_json: bytes | None = None,
    ) -> Entry:
        if key_json is None:
            key_json = render_key(key)
        return self.put(key, render_entry(key_json, value_json, expiry, revision), revision)

    def put(self, key: str, entry: Entry, revision: int) -> Entry:
        """Set key to an entry already rendered (set(), and the disk engine's replay)."""
        entries = self._entries
        old = entries.get(key)
        entries[key] = entry
        # One update of the byte count: a million of these at start-up.
        length = len(entry) - entry[0]
        if length >= MAPPED_BODY:
            length = held(length)
        if old is None:
            self.bytes += len(key) + length
            if self._index is not None:
                self._index.add(key)
            if self.sample_keys is not None:
                self.sample_keys.append(key)
        else:
            self.bytes += length - held(len(old) - old[0])
            if old[1]:
                self.with_expiry -= 1
        if self.uses is not None:
            self.uses[key] = self.new_use
        if revision > self.revision:
            self.revision = revision
        if entry[1]:
            self.with_expiry += 1
            heapq.heappush(self._expiries, (EXPIRY_AT(entry, EXPIRY_OFFSET)[0], key))
        return entry

    def put_many(self, keys: list[str], entries: list[Entry], top: int) -> None:
        """
        put() of each keys[i] to entries[i] (top: their highest revision), at
        C speed when the keys are new and distinct, as a compacted log's are
        (a million at start-up: the loop of put() was half the load).
        """
        held_now = self._entries
        if (
            self._index is not None
            or len(set(keys)) != len(keys)
            or any(map(held_now.__contains__, keys))
        ):
            for key, entry in zip(keys, entries, strict=True):
                self.put(key, entry, top)
            return
        if max(map(len, entries), default=0) < MAPPED_BODY:
            bodies = sum(map(len, entries)) - sum(map(BODY_AT, entries))
        else:
            bodies = sum(held(len(entry) - entry[0]) for entry in entries)
        held_now.update(zip(keys, entries, strict=True))
        self.bytes += bodies + sum(map(len, keys))
        if self.uses is not None:
            self.uses.update(dict.fromkeys(keys, self.new_use))
        if self.sample_keys is not None:
            self.sample_keys.extend(keys)
        if top > self.revision:
            self.revision = top
        flags = bytes(map(HAS_EXPIRY, entries))
        expiring = flags.count(1)
        if expiring:
            self.with_expiry += expiring
            heap, at = self._expiries, -1
            for _ in range(expiring):
                at = flags.index(1, at + 1)
                heapq.heappush(heap, (EXPIRY_AT(entries[at], EXPIRY_OFFSET)[0], keys[at]))

    def delete(self, key: str) -> bool:
        old = self._entries.pop(key, None)
        if old is None:
            return False
        self.bytes -= held(len(old) - old[0]) + len(key)
        if old[1]:
            self.with_expiry -= 1
        if self._index is not None:
            self._index.discard(key)
        if self.uses is not None:
            del self.uses[key]
        return True

    # -- changes that may arrive out of revision order (several nodes)

    def apply_set(
        self, key: str, value_json: bytes, expiry: float | None, revision: int
    ) -> Entry | None:
        """
        Set, unless memory already holds a later state of the key: an entry of
        a higher revision, or a remembered delete of a higher revision. Answers
        the new entry, or None when the change was older and left out.
        """
        old = self._entries.get(key)
        if old is not None and revision_of(old) > revision:
            return None
        if self._deleted is not None:
            deleted_at = self._deleted.get(key)
            if deleted_at is not None:
                if deleted_at > revision:
                    return None
                del self._deleted[key]
        return self.set(key, value_json, expiry, revision)

    def apply_delete(self, key: str, revision: int) -> bool:
        """Delete, unless the entry held is of a higher revision; False when left out."""
        old = self._entries.get(key)
        if old is not None and revision_of(old) > revision:
            return False
        if revision > self.revision:
            self.revision = revision
        if self._deleted is not None and revision > self._deleted.get(key, 0):
            self._deleted[key] = revision
            heapq.heappush(self._deleted_heap, (revision, key))
        if old is not None:
            self.delete(key)
        return True

    def remember_deletes(self) -> None:
        """
        Keep the revision of every applied delete until forget_deletes() passes
        it, so an older set of the key arriving late (another node's change read
        before the delete committed) cannot bring the key back.
        """
        if self._deleted is None:
            self._deleted = {}

    def forget_deletes(self, through: int) -> None:
        """Forget deletes of revision <= through: no older change can arrive any more."""
        deleted, heap = self._deleted, self._deleted_heap
        if deleted is None:
            return
        while heap and heap[0][0] <= through:
            revision, key = heapq.heappop(heap)
            if deleted.get(key) == revision:
                del deleted[key]

    @property
    def remembered_deletes(self) -> int:
        return 0 if self._deleted is None else len(self._deleted)

    def expire(self, now: float, limit: int = 10_000) -> int:
        """Drop up to `limit` entries whose expiry is at or before `now`."""
        removed = 0
        heap = self._expiries
        while heap and heap[0][0] <= now and removed < limit:
            expiry, key = heapq.heappop(heap)
            entry = self._entries.get(key)
            if entry is not None and expiry_of(entry) == expiry:
                self.delete(key)
                removed += 1
                if self.on_expire is not None:
                    self.on_expire(key, entry)
        # Stale heap items accumulate under overwrite-heavy loads; rebuild when
        # they clearly outnumber entries with an expiry.
        if len(heap) > 1024 and len(heap) > 4 * len(self._entries):
            self._rebuild_heap()
        self.expired_total += removed
        return removed

    def _rebuild_heap(self) -> None:
        self._expiries = [(expiry_of(e), k) for k, e in self._entries.items() if e[1]]  # type: ignore[misc]
        heapq.heapify(self._expiries)

    def items(self) -> Iterator[tuple[str, Entry]]:
        return iter(self._entries.items())

    def entries(self) -> dict[str, Entry]:
        """
        A copy of the key -> entry map, made in one C-level step (a list of
        a million (key, entry) tuples costs a hundred times more, mostly in
        garbage collection). Entries are never changed in place, so the copy
        is a consistent snapshot that another thread may read.
        """
        return self._entries.copy()

    def ordered_keys(self) -> list[str]:
        """Every key, in code-point order once the key index is kept (else as held)."""
        return list(self._index if self._index is not None else self._entries)

    def snapshot(self, now: float) -> list[tuple[str, Entry]]:
        """A list of the live (key, entry) pairs at `now`; safe to iterate later."""
        return [
            (k, e)
            for k, e in self._entries.items()
            if not e[1] or EXPIRY_AT(e, EXPIRY_OFFSET)[0] > now
        ]

    def max_revision(self) -> int:
        return max((revision_of(e) for e in self._entries.values()), default=0)
