"""
MAX_MEMORY and EVICTION_POLICY in memory (dache.testing.MemoryNode, task.Clock):
each policy's meaning, 507 with noeviction, evictions as deletes in the same
engine batch as the write that needed the room.
"""

from __future__ import annotations

import json
import random

import pytest
from twisted.internet.defer import inlineCallbacks

from dache.config import ConfigError, byte_size, resolve
from dache.engines import DELETE, SET
from dache.engines.memory import MemoryEngine
from dache.store.cache import ENTRY_OVERHEAD, EXPIRY_OVERHEAD, Cache, body_of
from dache.store.eviction import POLICIES, MemoryBound
from dache.testing import MemoryNode

VALUE = "x" * 400  # each entry costs about 430 + ENTRY_OVERHEAD bytes
ENTRY = 440 + ENTRY_OVERHEAD  # a little above one entry's cost
LIMIT = 20 * ENTRY  # room for about 20 entries


class RecordingEngine(MemoryEngine):
    """The memory engine, keeping each batch it was given."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[str, str]]] = []

    def write(self, changes):  # type: ignore[no-untyped-def]
        self.batches.append([(c.kind, c.key) for c in changes])
        return super().write(changes)


def node_with(policy: str, limit: int = LIMIT, samples: int = 16, **options) -> MemoryNode:  # type: ignore[no-untyped-def]
    node = MemoryNode(max_memory=limit, eviction_policy=policy, **options)
    node.bound.random = random.Random(7)  # the sample is seeded: each run the same
    node.bound.samples = samples
    return node


@inlineCallbacks
def set_key(node: MemoryNode, key: str, value: object = VALUE, **fields: object):  # type: ignore[no-untyped-def]
    response = yield node.http.post(node.url(key), json={"value": value, **fields})
    body = yield response.content()
    return response.code, (json.loads(body) if body else None)


@inlineCallbacks
def get_code(node: MemoryNode, key: str):  # type: ignore[no-untyped-def]
    response = yield node.http.get(node.url(key))
    yield response.content()
    return response.code


# -- settings


@pytest.mark.parametrize(
    "text, size",
    [("0", 0), ("1048576", 1 << 20), ("512mb", 512 << 20), ("2GB", 2 << 30), ("64kb", 64 << 10)],
)
def test_max_memory_accepts_bytes_with_redis_suffixes(text, size):
    assert byte_size(text) == size
    assert resolve({}, {"MAX_MEMORY": text}).max_memory == size


@pytest.mark.parametrize("text", ["-1", "12 apples", "mb", "1.5gb", ""])
def test_a_bad_max_memory_names_the_setting(text):
    with pytest.raises(ConfigError, match="MAX_MEMORY must be a number of bytes"):
        resolve({}, {"MAX_MEMORY": text})


def test_eviction_policy_takes_redis_names():
    assert resolve({}, {}).eviction_policy == "noeviction"
    for policy in POLICIES:
        assert resolve({"eviction-policy": policy}, {}).eviction_policy == policy
    with pytest.raises(ConfigError, match="EVICTION_POLICY must be one of: noeviction"):
        resolve({}, {"EVICTION_POLICY": "lru"})


# -- accounting


def test_used_counts_keys_bodies_and_the_measured_overhead():
    cache = Cache()
    cache.set("a", b'"1"')
    cache.set("b", b'"2"', expiry=2e9)
    with_expiry = len(body_of(cache.peek("b"))) + 1
    assert cache.used == (len(body_of(cache.peek("a"))) + 1 + ENTRY_OVERHEAD) + (
        with_expiry + ENTRY_OVERHEAD + EXPIRY_OVERHEAD
    )
    cache.set("b", b'"22"')  # the expiry is gone: so is its overhead
    cache.delete("a")
    assert cache.used == len(body_of(cache.peek("b"))) + 1 + ENTRY_OVERHEAD
    cache.delete("b")
    assert cache.used == 0 and cache.with_expiry == 0


@inlineCallbacks
def test_the_projection_of_a_write_is_what_it_then_costs():
    node = node_with("noeviction", limit=10**9)
    for key, fields in [("k", {}), ("é/ü", {}), ("t", {"expiry": 1_800_000_000.5})]:
        before = node.cache.used
        code, _ = yield set_key(node, key, {"n": [1, 2, 3]}, **fields)
        assert code == 204
        entry = node.cache.peek(key)
        assert node.cache.used - before == node.cache.entry_cost(key, entry)


# -- noeviction


@inlineCallbacks
def test_noeviction_answers_507_for_a_growing_write_and_changes_nothing():
    node = node_with("noeviction")
    acknowledged = []
    for i in range(40):
        code, body = yield set_key(node, f"k{i}")
        if code == 204:
            acknowledged.append(f"k{i}")
        else:
            assert code == 507
            assert "MAX_MEMORY" in body["error"] and "noeviction" in body["error"]
    assert 15 <= len(acknowledged) < 40
    assert node.cache.used <= LIMIT
    assert sorted(k for k, _ in node.cache.items()) == sorted(acknowledged)
    assert node.bound.refused == 40 - len(acknowledged)
    assert node.bound.evicted == 0
    # Reads are never refused; overwrites that shrink and deletes go through.
    for key in acknowledged:
        assert (yield get_code(node, key)) == 200
    code, _ = yield set_key(node, acknowledged[0], "small")
    assert code == 204
    response = yield node.http.delete(node.url(acknowledged[1]))
    assert response.code == 204
    # The room made lets more in, up to the limit again.
    codes = []
    for i in range(5):
        code, _ = yield set_key(node, f"new{i}")
        codes.append(code)
    assert codes[0] == 204 and codes[-1] == 507
    assert node.cache.used <= LIMIT


@inlineCallbacks
def test_without_a_limit_nothing_is_refused():
    node = node_with("noeviction", limit=0)
    for i in range(100):
        code, _ = yield set_key(node, f"k{i}")
        assert code == 204
    assert len(node.cache) == 100 and node.committer.bound is None


# -- the policies


@inlineCallbacks
def fill(node: MemoryNode, count: int, prefix: str = "k", **fields: object):  # type: ignore[no-untyped-def]
    for i in range(count):
        code, body = yield set_key(node, f"{prefix}{i}", **fields)
        assert code == 204, body
        assert node.cache.used <= node.bound.limit


@inlineCallbacks
def test_allkeys_lru_keeps_the_recently_read_keys():
    node = node_with("allkeys-lru")
    yield fill(node, 10, prefix="hot")
    for i in range(200):
        code, _ = yield set_key(node, f"cold{i}")
        assert code == 204
        for h in range(10):  # the hot keys are read between writes
            assert (yield get_code(node, f"hot{h}")) == 200
    assert all(f"hot{h}" in node.cache for h in range(10))
    assert node.cache.used <= LIMIT
    assert node.bound.evicted >= 180


@inlineCallbacks
def test_allkeys_lfu_keeps_the_frequently_read_keys():
    node = node_with("allkeys-lfu")
    yield fill(node, 8, prefix="hot")
    for _ in range(100):  # read often, then not at all
        for h in range(8):
            assert (yield get_code(node, f"hot{h}")) == 200
    for i in range(200):
        code, _ = yield set_key(node, f"cold{i}")
        assert code == 204
        yield get_code(node, f"cold{i}")  # one read each: rarely used
    assert all(f"hot{h}" in node.cache for h in range(8))
    assert node.cache.used <= LIMIT


@inlineCallbacks
def test_lfu_counts_decay_when_keys_go_unused():
    node = node_with("allkeys-lfu")
    yield fill(node, 1, prefix="once-hot")
    for _ in range(200):
        yield get_code(node, "once-hot0")
    uses = node.cache.uses
    period = int(node.clock.seconds()) // 60
    hot = node.bound.counter(uses["once-hot0"], period)
    assert hot > 5
    node.clock.advance(60 * (hot + 1))  # a minute per count, without a read
    assert node.bound.counter(uses["once-hot0"], int(node.clock.seconds()) // 60) == 0


@inlineCallbacks
def test_allkeys_random_evicts_and_keeps_the_write():
    node = node_with("allkeys-random")
    yield fill(node, 100)
    assert len(node.cache) < 30 and "k99" in node.cache
    assert node.bound.evicted == 100 - len(node.cache)


@pytest.mark.parametrize("policy", ["volatile-lru", "volatile-lfu", "volatile-random"])
@inlineCallbacks
def test_volatile_policies_evict_only_keys_with_an_expiry(policy):
    node = node_with(policy)
    yield fill(node, 5, prefix="kept")
    yield fill(node, 100, prefix="volatile", ttl=3600)
    assert all(f"kept{i}" in node.cache for i in range(5))
    assert "volatile99" in node.cache
    assert node.bound.evicted > 70


@pytest.mark.parametrize("policy", ["volatile-lru", "volatile-ttl", "volatile-random"])
@inlineCallbacks
def test_volatile_with_nothing_volatile_left_refuses_and_evicts_nothing(policy):
    node = node_with(policy)
    for i in range(40):
        yield set_key(node, f"k{i}")
    before = sorted(k for k, _ in node.cache.items())
    code, body = yield set_key(node, "one-more")
    assert code == 507 and "expiry" in body["error"]
    assert sorted(k for k, _ in node.cache.items()) == before
    assert node.bound.evicted == 0


@inlineCallbacks
def test_volatile_ttl_evicts_the_soonest_expiring():
    node = node_with("volatile-ttl", samples=64)  # a sample this large sees every key
    now = node.clock.seconds()
    for i in range(18):
        code, _ = yield set_key(node, f"t{i}", expiry=now + 1000 + i)
        assert code == 204
    for i in range(4):
        code, _ = yield set_key(node, f"late{i}", expiry=now + 5000)
        assert code == 204
    # Each write past the limit evicted the soonest-expiring key left.
    held = sorted(int(k[1:]) for k, _ in node.cache.items() if k.startswith("t"))
    assert held == list(range(18 - len(held), 18))
    assert all(f"late{i}" in node.cache for i in range(4))


@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "noeviction"])
@inlineCallbacks
def test_a_value_larger_than_the_limit_is_refused_and_evicts_nothing(policy):
    node = node_with(policy)
    yield fill(node, 10, ttl=3600)
    code, body = yield set_key(node, "huge", "y" * (LIMIT + 1), ttl=3600)
    assert code == 507 and "MAX_MEMORY" in body["error"]
    assert len(node.cache) == 10 and node.bound.evicted == 0


@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "noeviction"])
@inlineCallbacks
def test_evictions_are_deletes_in_the_same_engine_batch_as_the_write(policy):
    engine = RecordingEngine()
    node = node_with(policy, engine=engine)
    yield fill(node, 60, ttl=3600)
    evicting = [batch for batch in engine.batches if len(batch) > 1]
    assert evicting, "no write needed room"
    for batch in evicting:
        assert batch[-1][0] == SET  # the deletes that made room, then the write
        assert {kind for kind, _ in batch[:-1]} == {DELETE}
    deleted = {key for batch in evicting for kind, key in batch if kind == DELETE}
    assert deleted.isdisjoint(k for k, _ in node.cache.items())
    assert len(deleted) == node.bound.evicted == 60 - len(node.cache)


@inlineCallbacks
def test_overwrites_in_one_batch_are_projected_in_order():
    cache = Cache()
    bound = MemoryBound(cache, 3 * ENTRY, "noeviction")
    from dache.engines import Change

    changes = [Change.set(f"k{i}", b'"' + b"x" * 400 + b'"') for i in range(3)]
    changes.append(Change.set("k0", b'"small"'))  # shrinks k0: fits
    changes.append(Change.set("k3", b'"' + b"x" * 400 + b'"'))  # past the limit
    refused = []

    class Waiter:
        def callback(self, revision):  # type: ignore[no-untyped-def]
            pass

        def errback(self, failure):  # type: ignore[no-untyped-def]
            refused.append(failure.value)

    waiters = [Waiter() for _ in changes]
    kept, kept_waiters, changed = bound.admit(changes, waiters, answered=False)
    assert changed
    assert [c.key for c in kept] == ["k0", "k1", "k2", "k0"]  # k3 refused
    assert len(refused) == 1 and len(kept_waiters) == 4
    yield None


# -- what a node reports


@inlineCallbacks
def test_health_and_metrics_report_used_limit_evictions_and_refusals():
    from dache.web.health import HealthMonitor
    from dache.web.metrics import Metrics

    node = node_with("allkeys-lru")
    monitor = HealthMonitor(node.engine, node.committer, node.cache, node.clock)
    metrics = Metrics(node.cache, node.committer, monitor, process=False)
    yield fill(node, 30)
    code, _ = yield set_key(node, "huge", "y" * (LIMIT + 1))
    assert code == 507
    _, document = yield monitor.health()
    checks = document["checks"]
    assert checks["memory:used"][0]["observedValue"] == node.cache.used
    assert checks["memory:limit"][0]["observedValue"] == LIMIT
    from prometheus_client import generate_latest

    text = generate_latest(metrics.registry).decode()
    assert f"dache_memory_used_bytes {float(node.cache.used)}" in text
    assert f"dache_memory_limit_bytes {float(LIMIT)}" in text
    evicted = node.bound.evicted
    assert evicted > 0
    assert f'dache_evicted_keys_total{{policy="allkeys-lru"}} {float(evicted)}' in text
    assert 'dache_writes_refused_total{reason="memory"} 1.0' in text


# -- atomic batches (POST /dache) and PATCH


@inlineCallbacks
def post_batch(node: MemoryNode, ops: list[dict]):  # type: ignore[no-untyped-def]
    response = yield node.http.post("http://dache.test/dache", json={"ops": ops})
    body = yield response.content()
    return response.code, json.loads(body)


@inlineCallbacks
def test_a_batch_that_does_not_fit_is_refused_whole_with_noeviction():
    node = node_with("noeviction")
    yield fill(node, 15)
    ops = [{"op": "set", "key": f"b{i}", "value": VALUE} for i in range(10)]
    code, body = yield post_batch(node, ops)
    assert code == 507 and "MAX_MEMORY" in body["error"]
    assert not any(f"b{i}" in node.cache for i in range(10))
    code, body = yield post_batch(node, ops[:2])  # what fits goes through
    assert code == 200, body
    assert "b0" in node.cache and "b1" in node.cache


@inlineCallbacks
def test_a_batch_is_made_room_for_before_it_with_consecutive_revisions():
    engine = RecordingEngine()
    node = node_with("allkeys-lru", engine=engine)
    yield fill(node, 19)
    ops = [{"op": "set", "key": f"b{i}", "value": VALUE} for i in range(5)]
    code, body = yield post_batch(node, ops)
    assert code == 200, body
    assert all(f"b{i}" in node.cache for i in range(5))
    assert node.cache.used <= LIMIT
    last = engine.batches[-1]
    assert [kind for kind, _ in last[-5:]] == [SET] * 5
    assert {kind for kind, _ in last[:-5]} == {DELETE} and len(last) > 5
    revisions = body["results"]
    assert revisions == list(range(revisions[0], revisions[0] + 5))
    assert revisions[-1] == node.committer.revision


def test_the_get_path_is_the_cache_s_own_unless_lru_or_lfu_needs_a_store():
    for policy, limit in [("noeviction", LIMIT), ("allkeys-random", LIMIT), ("allkeys-lru", 0)]:
        node = node_with(policy, limit=limit)
        assert "get" not in vars(node.cache), policy  # Cache.get itself: nothing added
    for policy in ("allkeys-lru", "volatile-lfu"):
        assert "get" in vars(node_with(policy).cache)


@inlineCallbacks
def test_an_lru_read_moves_a_key_to_the_current_tick():
    node = node_with("allkeys-lru")
    yield fill(node, 3)
    ticks = [node.cache.uses[f"k{i}"] for i in range(3)]
    assert ticks == sorted(ticks) and ticks[0] < ticks[2]  # one tick per write batch
    assert (yield get_code(node, "k0")) == 200
    assert node.cache.uses["k0"] == node.cache.new_use >= ticks[2]


def test_bodies_with_pages_of_their_own_count_whole_pages():
    # Under a bound, glibc maps blocks of 32 KiB and more on their own
    # (dache.mallocpolicy): RSS grows by whole pages, and so does `used`.
    cache = Cache()
    cache.set("small", b'"' + b"x" * 1000 + b'"')
    small = len(body_of(cache.peek("small")))
    assert cache.bytes == len("small") + small  # below the threshold: as long as it is
    cache.set("large", b'"' + b"x" * 40_000 + b'"')
    large = len(body_of(cache.peek("large")))
    counted = cache.bytes - len("small") - small - len("large")
    assert counted > large and (counted + 64) % 4096 == 0
    assert cache.entry_cost("large", cache.peek("large")) == len("large") + counted + ENTRY_OVERHEAD
    cache.delete("large")
    cache.delete("small")
    assert cache.bytes == 0


def test_the_watch_history_budget_is_kept_within_max_memory():
    cache = Cache()
    bound = MemoryBound(cache, 1024 * 1024, "allkeys-lru")
    assert bound.reserve_history(16 * 1024 * 1024) == 128 * 1024  # an eighth of the bound
    assert cache.used == 128 * 1024  # counted from the start, before the first write
    assert MemoryBound(Cache(), 1 << 30).reserve_history(16 << 20) == 16 << 20
    unbounded = Cache()
    assert MemoryBound(unbounded, 0).reserve_history(16 << 20) == 16 << 20
    assert unbounded.used == 0  # no bound: nothing to keep it within
