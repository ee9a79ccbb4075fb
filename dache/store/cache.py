"""
The in-memory map: entries, their expiry index and size accounting.

Pure: no I/O and no reactor. Callers pass `now` (unix seconds) explicitly, so
expiry is driven by whatever clock the service injects.

An entry keeps its GET response body pre-rendered, with the value's JSON text
at its end, so a read is one dict lookup and one write of bytes:

    {"key":<key>,"expiry":<expiry>,"value":<value>}     ("expiry" only if set)
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Callable, Iterator

from dache.rendering import render_json, render_key
from dache.store.keyindex import KeyIndex

_OFFSET_BITS = 32
_OFFSET_MASK = (1 << _OFFSET_BITS) - 1

# What an entry's objects cost beyond its key's and body's characters,
# measured (CPython 3.11, 64-bit): RSS growth of a process filling a Cache
# with 300,000 entries, less their keys and bodies, per entry (221 B with
# 1 KiB and 100 B values, 207 B with 16 B ones: the key's str header and the
# body's bytes header, the Entry, its packed int, the dict slot, malloc's
# own header). An expiry adds a float, a tuple and a heap item (+161 B).
# docs/DESIGN.md "Memory and eviction" says how to measure it again.
ENTRY_OVERHEAD = 224
EXPIRY_OVERHEAD = 160


class Entry:
    """
    One live key: its pre-rendered body, expiry and revision.

    Three slots, not five, because a cache holds millions of these: an object
    with three slots takes 64 bytes (with the collector's header). The revision
    and the value's offset in the body share one int (revision << 32 | offset);
    an entry with an expiry holds (expiry, that int). `use` is the eviction
    policy's one small int (dache.store.eviction): the LRU clock tick of its
    last use, or the LFU (period << 8 | counter); always a shared int object,
    so a read that stores it allocates nothing.
    """

    __slots__ = ("body", "_meta", "use")

    def __init__(
        self, body: bytes, value_offset: int, expiry: float | None, revision: int, use: int = 0
    ):
        self.body = body
        packed = revision << _OFFSET_BITS | value_offset
        self._meta: int | tuple[float, int] = packed if expiry is None else (expiry, packed)
        self.use = use

    @property
    def expiry(self) -> float | None:
        meta = self._meta
        return meta[0] if meta.__class__ is tuple else None  # type: ignore[index]

    @property
    def revision(self) -> int:
        meta = self._meta
        return (meta[1] if meta.__class__ is tuple else meta) >> _OFFSET_BITS  # type: ignore

    @property
    def value_offset(self) -> int:
        meta = self._meta
        return (meta[1] if meta.__class__ is tuple else meta) & _OFFSET_MASK  # type: ignore

    @property
    def value_json(self) -> bytes:
        """The value's JSON text, exactly as stored."""
        return self.body[self.value_offset : -1]

    @property
    def value(self) -> object:
        return json.loads(self.value_json)

    @classmethod
    def render(
        cls, key_json: bytes, value_json: bytes, expiry: float | None, revision: int
    ) -> Entry:
        if expiry is None:  # one formatting, no intermediate bytes
            body = b'{"key":%b,"value":%b}' % (key_json, value_json)
            return cls(body, len(key_json) + 16, None, revision)  # 16: {"key": ,"value":
        head = b'{"key":%b,"expiry":%b,"value":' % (key_json, render_json(expiry))
        return cls(head + value_json + b"}", len(head), expiry, revision)


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
        # The `use` a new or rewritten entry starts with; the eviction policy
        # keeps it current (dache.store.eviction.Tracker).
        self.new_use = 0
        # Keys to sample from for allkeys-* eviction (dache.store.eviction):
        # appended when a key is new, removed lazily when sampled. None: not kept.
        self.sample_keys: list[str] | None = None
        self.entry_overhead = ENTRY_OVERHEAD  # + a list slot while sample_keys is kept
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
        )

    def cost(self, key: str, body_length: int, has_expiry: bool) -> int:
        """What one entry adds to `used` (the committer's projection before a write)."""
        extra = self.entry_overhead + (EXPIRY_OVERHEAD if has_expiry else 0)
        return len(key) + body_length + extra

    def entry_cost(self, key: str, entry: Entry) -> int:
        return self.cost(key, len(entry.body), entry._meta.__class__ is tuple)

    def get(self, key: str, now: float) -> Entry | None:
        """The live entry for key at `now`, or None (missing or expired)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        meta = entry._meta  # Entry.expiry, inlined: this is every GET
        if meta.__class__ is tuple and meta[0] <= now:  # type: ignore[index]
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
        if expiry is None:  # Entry.render, inlined: a million of these at start-up
            body = b'{"key":%b,"value":%b}' % (key_json, value_json)
            entry = Entry(body, len(key_json) + 16, None, revision, self.new_use)
        else:
            entry = Entry.render(key_json, value_json, expiry, revision)
            entry.use = self.new_use
            self.with_expiry += 1
        entries = self._entries
        old = entries.get(key)
        entries[key] = entry
        # One update of the byte count: a million of these at start-up.
        if old is None:
            self.bytes += len(key) + len(entry.body)
            if self._index is not None:
                self._index.add(key)
            if self.sample_keys is not None:
                self.sample_keys.append(key)
        else:
            self.bytes += len(entry.body) - len(old.body)
            if old._meta.__class__ is tuple:
                self.with_expiry -= 1
        if revision > self.revision:
            self.revision = revision
        if expiry is not None:
            heapq.heappush(self._expiries, (expiry, key))
        return entry

    def delete(self, key: str) -> bool:
        old = self._entries.pop(key, None)
        if old is None:
            return False
        self.bytes -= len(old.body) + len(key)
        if old._meta.__class__ is tuple:
            self.with_expiry -= 1
        if self._index is not None:
            self._index.discard(key)
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
        if old is not None and old.revision > revision:
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
        if old is not None and old.revision > revision:
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
            if entry is not None and entry.expiry == expiry:
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
        self._expiries = [(e.expiry, k) for k, e in self._entries.items() if e.expiry is not None]
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

    def snapshot(self, now: float) -> list[tuple[str, Entry]]:
        """A list of the live (key, entry) pairs at `now`; safe to iterate later."""
        return [(k, e) for k, e in self._entries.items() if e.expiry is None or e.expiry > now]

    def max_revision(self) -> int:
        return max((e.revision for e in self._entries.values()), default=0)
