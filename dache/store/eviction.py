"""
The memory bound: MAX_MEMORY and EVICTION_POLICY (Redis's vocabulary).

The cache counts what its entries really take (Cache.used: keys, bodies and
the measured per-entry overhead). Before a batch of changes goes to the
engine, the committer asks MemoryBound.admit() to fit it under the limit:

- a change that does not grow the cache (a delete, a smaller overwrite) is
  always admitted; reads are never refused;
- with `noeviction`, a set that would take the cache past the limit is
  refused with OutOfMemory (HTTP 507) and changes nothing;
- with another policy, make_room() chooses victims and their deletes join
  the same engine batch, just before the write that needed the room, so an
  eviction is as durable as any delete: a restart, a kill -9 or another node
  on the same PostgreSQL table never brings the key back. A set that cannot be made
  room for (larger than the limit, or volatile-* with nothing volatile left)
  is refused and evicts nothing.

Victims are chosen the way Redis does it (evict.c): sample a few random
keys, evict the best of them by the policy, repeat. The per-key state is
one small int in Cache.uses (kept only under an LRU / LFU policy: a dict slot
per key), always a shared int object so storing it on a read allocates
nothing:

- LRU: a logical clock that ticks once per write batch. A read stores the
  current tick; the sample's smallest tick is the least recently used.
- LFU: (period << 8 | counter), Redis's logarithmic counter (LFU_LOG_FACTOR)
  that loses one per LFU_DECAY_SECONDS without use; the ints of the current
  period are made once per period and shared.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from typing import Any

from twisted.internet.defer import DeferredList, inlineCallbacks
from twisted.python.failure import Failure

from dache.engines import DELETE, SET, Change
from dache.errors import StartupError
from dache.rendering import render_json, render_key
from dache.store.cache import ENTRY_OVERHEAD, EXPIRY_AT, Cache, Entry, expiry_of

POLICIES = (
    "noeviction",
    "allkeys-lru",
    "allkeys-lfu",
    "allkeys-random",
    "volatile-lru",
    "volatile-lfu",
    "volatile-random",
    "volatile-ttl",
)
SAMPLES = 8  # keys sampled per victim (Redis: maxmemory-samples 5, with a pool of 16)
GIVE_UP_AFTER = 64  # samples in a row that found no candidate
SAMPLE_SLOT = 8  # allkeys-*: a key's pointer in Cache.sample_keys
USE_SLOT = 26  # LRU / LFU: a key's slot in Cache.uses (measured like ENTRY_OVERHEAD)
HISTORY_SHARE = 8  # the watch history may take up to 1/8 of MAX_MEMORY
LFU_INIT = 5  # a new key's counter (Redis's LFU_INIT_VAL)
LFU_LOG_FACTOR = 10
LFU_DECAY_SECONDS = 60


class OutOfMemory(Exception):
    """A write that MAX_MEMORY has no room for; str() is for the client (507)."""


class _Evicted:
    """The waiter of an eviction's delete: counts it once it is durable and applied."""

    def __init__(self, bound: MemoryBound):
        self.bound = bound

    def callback(self, revision: int) -> None:
        self.bound.evicted += 1

    def errback(self, failure: Failure) -> None:
        self.bound.pending_evictions = 0  # the batch failed: the keys are still there


def _stale(item: tuple[float, str], entries_get: Callable[[str], Entry | None]) -> bool:
    entry = entries_get(item[1])
    return entry is None or expiry_of(entry) != item[0]


def body_length(key_json_length: int, value_length: int, expiry_json_length: int | None) -> int:
    """The rendered entry's length (see dache.store.cache: {"key":..,"value":..})."""
    if expiry_json_length is None:
        return key_json_length + value_length + 17
    return key_json_length + value_length + expiry_json_length + 27


class MemoryBound:
    """One node's limit and policy over its cache; limit 0 means no bound."""

    def __init__(
        self,
        cache: Cache,
        limit: int,
        policy: str = "noeviction",
        rng: random.Random | None = None,
        samples: int = SAMPLES,
    ):
        if policy not in POLICIES:
            raise ValueError(f"unknown eviction policy {policy!r}")
        self.cache = cache
        self.limit = limit
        self.policy = policy
        self.samples = samples
        self.random = rng if rng is not None else random.Random()
        self.volatile = policy.startswith("volatile-")
        self.kind = policy.partition("-")[2]  # lru, lfu, random, ttl ("" for noeviction)
        self.evicted = 0  # keys evicted (durable deletes applied)
        self.refused = 0  # writes answered 507
        self.pending_evictions = 0  # submitted by enforce(), not yet applied
        self._waiter = _Evicted(self)
        self._lfu_period = -1
        self._lfu_ints: list[int] = []
        overhead = ENTRY_OVERHEAD
        if limit and self.kind in ("lru", "lfu"):
            cache.uses = dict.fromkeys(cache._entries, cache.new_use)
            overhead += USE_SLOT
            self._install_reads()
        if limit and self.evicts and not self.volatile:
            cache.sample_keys = list(cache._entries)
            overhead += SAMPLE_SLOT
        cache.entry_overhead = overhead

    def reserve_history(self, history_bytes: int) -> int:
        """
        Keep the watch history's budget (WATCH_HISTORY_BYTES: it holds a copy of
        each recent value) within MAX_MEMORY, at most an eighth of it so the
        entries keep the rest. Answers the history's byte bound to use.
        """
        if not self.limit:
            return history_bytes
        self.cache.reserved = min(history_bytes, self.limit // HISTORY_SHARE)
        return self.cache.reserved

    @property
    def evicts(self) -> bool:
        return self.policy != "noeviction"

    # -- the per-read use (installed only with an LRU / LFU policy)

    def _install_reads(self) -> None:
        cache = self.cache
        entries_get = cache._entries.get
        uses: dict[str, int] = cache.uses  # type: ignore[assignment]
        if self.kind == "lru":

            def get_lru(key: str, now: float) -> Entry | None:
                entry = entries_get(key)
                if entry is None:
                    return None
                if entry[1] and EXPIRY_AT(entry, 7)[0] <= now:  # 7: EXPIRY_OFFSET
                    return None
                uses[key] = cache.new_use  # the current tick: one store
                return entry

            cache.get = get_lru  # type: ignore[method-assign]
            return
        chance = self.random.random
        bound = self
        ints = self._lfu_ints  # this period's uses, changed in place each period

        def get_lfu(key: str, now: float) -> Entry | None:
            entry = entries_get(key)
            if entry is None:
                return None
            if entry[1] and EXPIRY_AT(entry, 7)[0] <= now:  # 7: EXPIRY_OFFSET
                return None
            use = uses[key]
            period = int(now) // LFU_DECAY_SECONDS
            if use >> 8 == period:  # used this period already: no decay to apply
                counter = use & 255
            else:
                if period != bound._lfu_period:
                    bound._new_period(period)
                counter = bound.counter(use, period)
                uses[key] = ints[counter]
            # Redis's LFULogIncr: certain up to LFU_INIT, then ever less likely.
            if counter < 255 and (
                counter <= LFU_INIT or chance() * ((counter - LFU_INIT) * LFU_LOG_FACTOR + 1) < 1
            ):
                uses[key] = ints[counter + 1]
            return entry

        cache.get = get_lfu  # type: ignore[method-assign]
        self._new_period(0)

    def _new_period(self, period: int) -> None:
        self._lfu_period = period
        self._lfu_ints[:] = [period << 8 | counter for counter in range(256)]
        self.cache.new_use = self._lfu_ints[LFU_INIT]

    @staticmethod
    def counter(use: int, period: int) -> int:
        """An LFU use's counter as of `period`: one less per decay period without use."""
        counter = use & 255
        idle = period - (use >> 8)
        return counter - idle if idle < counter else 0

    def tick(self, now: float) -> None:
        """Once per write batch (the committer): the LRU clock, the LFU period."""
        if self.kind == "lru":
            self.cache.new_use += 1
        elif self.kind == "lfu":
            period = int(now) // LFU_DECAY_SECONDS
            if period != self._lfu_period:
                self._new_period(period)

    # -- choosing victims

    def _sample(self) -> list[tuple[str, Entry]]:
        """Up to `samples` random live (key, entry) pairs of the policy's population."""
        cache, entries_get, rand = self.cache, self.cache._entries.get, self.random.random
        found = []
        if self.volatile:
            heap = cache._expiries  # (expiry, key); stale items are skipped
            if len(heap) > 2 * cache.with_expiry + 64:  # evicted keys' items piled up
                cache._rebuild_heap()
                heap = cache._expiries
            if self.kind == "ttl":
                # Better than a sample: the heap's top holds the soonest expiries.
                while heap and _stale(heap[0], entries_get):
                    heapq.heappop(heap)
                for expiry, key in heap[: 2 * self.samples]:
                    entry = entries_get(key)
                    if entry is not None and expiry_of(entry) == expiry:
                        found.append((key, entry))
                return found
            if heap:
                for _ in range(self.samples):
                    expiry, key = heap[int(rand() * len(heap))]
                    entry = entries_get(key)
                    if entry is not None and expiry_of(entry) == expiry:
                        found.append((key, entry))
            return found
        keys = cache.sample_keys
        if keys is None or len(keys) > 2 * len(cache) + 1024:  # deleted keys piled up
            keys = cache.sample_keys = list(cache._entries)
        for _ in range(self.samples):
            if not keys:
                break
            i = int(rand() * len(keys))
            key = keys[i]
            entry = entries_get(key)
            if entry is None:  # deleted since: drop it from the list
                keys[i] = keys[-1]
                keys.pop()
                continue
            found.append((key, entry))
        return found

    def _score(self, key: str, entry: Entry) -> float:
        """Lower is evicted first."""
        kind = self.kind
        if kind == "lru":
            return self.cache.uses[key]  # type: ignore[index]
        if kind == "lfu":
            return self.counter(self.cache.uses[key], self._lfu_period)  # type: ignore[index]
        if kind == "ttl":
            return expiry_of(entry)  # type: ignore[return-value]
        return 0.0  # random: the first sampled

    def make_room(self, needed: int, protected: AbstractSet[str]) -> list[tuple[str, int]]:
        """
        Victims whose entries free at least `needed` bytes, none of them in
        `protected`; [] when they cannot be found (then nothing is evicted).
        """
        cache = self.cache
        if self.volatile and cache.with_expiry == 0:
            return []
        chosen: dict[str, int] = {}
        freed = 0
        misses = 0
        score_of = self._score
        # The LRU score is a dict read: inlined, it is a quarter of an evicting write's sampling.
        lru_uses = cache.uses if self.kind == "lru" else None
        random_pick = self.kind == "random"
        while freed < needed:
            best: tuple[str, Entry] | None = None
            best_score = 0.0
            for key, entry in self._sample():
                if key in chosen or key in protected:
                    continue
                if random_pick:
                    best = key, entry
                    break
                score = lru_uses[key] if lru_uses is not None else score_of(key, entry)
                if best is None or score < best_score:
                    best, best_score = (key, entry), score
            if best is None:
                misses += 1
                if misses >= GIVE_UP_AFTER:
                    return []
                continue
            misses = 0
            key, entry = best
            cost = cache.entry_cost(key, entry)
            chosen[key] = cost
            freed += cost
        return list(chosen.items())

    # -- the committer's check of a batch

    def refusal(self, size: int, needed: int) -> OutOfMemory:
        self.refused += 1
        if self.evicts:
            why = (
                "no entry with an expiry is left to evict"
                if self.volatile
                else "not enough can be evicted"
            )
            return OutOfMemory(
                f"MAX_MEMORY: the write needs {needed} more bytes and {why} "
                f"(EVICTION_POLICY={self.policy}, limit {self.limit} bytes)"
            )
        return OutOfMemory(
            f"MAX_MEMORY: the cache holds {self.cache.used} of its {self.limit} bytes and "
            f"this {size}-byte entry does not fit (EVICTION_POLICY=noeviction); delete keys "
            "or raise MAX_MEMORY"
        )

    def admit(
        self, changes: list[Any], waiters: list[Any], answered: bool
    ) -> tuple[list[Any], list[Any], bool]:
        """
        The batch that fits: a set (or an atomic group, all of it) that grows
        the cache past the limit is refused (waiter.errback(OutOfMemory)) or
        made room for by eviction deletes, placed just before it so that a
        replay of the batch (the disk engine's log) never holds more than the
        limit either. Answers the changes, their waiters, and whether that
        differs from what was given.
        """
        cache, limit = self.cache, self.limit
        used = cache.used
        taken = {change.key for change in changes}  # never evicted: the batch's keys, victims
        projected: dict[str, int] = {}  # key -> its cost after the earlier changes here
        kept_changes: list[Any] = []
        kept_waiters: list[Any] = []
        changed = False
        i = 0
        while i < len(changes):
            group = getattr(changes[i], "group", None)
            size = len(group.changes) if group is not None else 1
            unit = range(i, i + size)
            i += size
            growth, largest, after = 0, 0, {}
            for j in unit:
                change = changes[j]
                if change.kind not in (SET, DELETE):
                    continue  # a GET in a group takes no room
                key = change.key
                old = after.get(key, projected.get(key))
                if old is None:
                    entry = cache.peek(key)
                    old = 0 if entry is None else cache.entry_cost(key, entry)
                new = self._cost(change) if change.kind == SET else 0
                growth += new - old
                largest = max(largest, new)
                after[key] = new
            if growth > 0 and used + growth > limit:
                room = []
                if self.evicts and largest <= limit:
                    room = self.make_room(used + growth - limit, taken)
                if not room:
                    changed = True
                    refusal = self.refusal(largest, used + growth - limit)
                    if not answered:
                        for j in unit:
                            waiters[j].errback(Failure(refusal))
                    continue
                changed = True
                for victim, cost in room:
                    taken.add(victim)
                    kept_changes.append(Change.delete(victim))
                    kept_waiters.append(self._waiter)
                    used -= cost
            used += growth
            projected.update(after)
            for j in unit:
                kept_changes.append(changes[j])
                kept_waiters.append(waiters[j])
        return kept_changes, kept_waiters, changed

    def _cost(self, change: Any) -> int:
        key, expiry = change.key, change.expiry
        # A plain ASCII key renders as itself in quotes; others as JSON escapes them.
        plain = key.isascii() and key.isprintable() and '"' not in key and "\\" not in key
        length = body_length(
            len(key) + 2 if plain else len(render_key(key)),
            len(change.value_json),
            None if expiry is None else len(render_json(expiry)),
        )
        return self.cache.cost(change.key, length, expiry is not None)

    # -- over the limit without a write asking (other nodes' changes)

    def over(self) -> int:
        """Bytes past the limit (0 when within it, or without a bound)."""
        return max(self.cache.used - self.limit, 0) if self.limit else 0

    def enforce(self, submit: Callable[[Any, Any], None]) -> int:
        """
        Evict, through `submit` (the committer's submit_to), what takes memory
        past the limit: changes applied from other nodes sharing the
        PostgreSQL table grow it without a write of ours. Answers how many.
        """
        excess = self.over()
        if not excess or not self.evicts or self.pending_evictions:
            return 0
        room = self.make_room(excess, frozenset())
        self.pending_evictions = len(room)
        waiter = _Enforced(self)
        for victim, _ in room:
            submit(Change.delete(victim), waiter)
        return len(room)


class _Enforced(_Evicted):
    def callback(self, revision: int) -> None:
        self.bound.evicted += 1
        self.bound.pending_evictions = max(self.bound.pending_evictions - 1, 0)


def describe(size: int) -> str:
    """A byte count for a person: 67108864 -> '64.0 MiB'."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


class LoadBound:
    """
    MAX_MEMORY while the engine's content is loaded: evict by the policy as
    entries arrive (deleted durably once loaded, before the node serves), or,
    with noeviction, refuse to start with one line naming the sizes. Never a
    half-loaded node that serves, never more than twice the limit held.
    """

    def __init__(self, bound: MemoryBound, limit: int):
        self.bound = bound
        self.limit = limit
        self.active = bool(limit)
        self.evicted: set[str] = set()  # evicted keys the engine still holds

    def loaded(self, key: str) -> None:
        """A key the load just set or deleted."""
        bound, cache = self.bound, self.bound.cache
        self.evicted.discard(key)  # set again or deleted by a later record
        used = cache.used
        if used <= self.limit:
            return
        if not bound.evicts:
            # A log replay can peak above its final content: decide at the end,
            # unless memory grows past twice the limit.
            if used > 2 * self.limit:
                self.refuse()
            return
        room = bound.make_room(used - self.limit, {key})
        if not room:
            self.refuse()
        for victim, _ in room:
            cache.delete(victim)
            self.evicted.add(victim)

    def finished(self) -> None:
        if self.active and self.bound.cache.used > self.limit:
            self.refuse()
        self.active = False

    def refuse(self) -> None:
        cache, policy = self.bound.cache, self.bound.policy
        held = (
            f"holds more than {describe(2 * self.limit)}"
            if cache.used > 2 * self.limit
            else f"holds {describe(cache.used)} ({len(cache)} entries)"
        )
        what = (
            "EVICTION_POLICY=noeviction: raise MAX_MEMORY or choose a policy that evicts"
            if policy == "noeviction"
            else f"EVICTION_POLICY={policy} finds nothing more to evict"
        )
        raise StartupError(
            f"the engine {held}, over MAX_MEMORY={self.limit} bytes ({describe(self.limit)}); "
            + what
        )

    def delete_evicted(self, committer: Any, chunk: int = 10_000) -> Any:
        """Delete the evicted keys through the committer, in batches; fires with the count."""
        keys = sorted(self.evicted)
        self.evicted = set()

        @inlineCallbacks
        def run() -> Any:
            for start in range(0, len(keys), chunk):
                yield DeferredList(
                    [committer.submit(Change.delete(k)) for k in keys[start : start + chunk]],
                    fireOnOneErrback=True,
                    consumeErrors=True,
                )
            self.bound.evicted += len(keys)
            return len(keys)

        return run()
