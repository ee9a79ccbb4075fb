import json

import pytest

from dache.rendering import render_json, render_key
from dache.store.cache import Cache, body_of, render_entry, revision_of, value_json_of, value_of


def test_set_get_delete():
    cache = Cache()
    cache.set("k", b'{"a":1}', revision=3)
    entry = cache.get("k", now=0)
    assert json.loads(body_of(entry)) == {"key": "k", "value": {"a": 1}}
    assert value_json_of(entry) == b'{"a":1}'
    assert revision_of(entry) == 3
    assert len(cache) == 1
    assert cache.delete("k") is True
    assert cache.get("k", now=0) is None
    assert cache.delete("k") is False
    assert len(cache) == 0


def test_body_carries_expiry_and_unicode():
    entry = render_entry(render_json("clé/ü"), b'"v\xc3\xa9"', 1700000000.5, 1)
    assert json.loads(body_of(entry)) == {"key": "clé/ü", "expiry": 1700000000.5, "value": "vé"}
    assert value_of(entry) == "vé"


def test_expired_entry_is_never_served_even_before_the_sweep():
    cache = Cache()
    cache.set("k", b"1", expiry=100.0)
    assert cache.get("k", now=99.999) is not None
    assert cache.get("k", now=100.0) is None  # at the instant: gone
    assert "k" in cache  # still held until swept


def test_sweep_drops_expired_entries_only():
    cache = Cache()
    cache.set("a", b"1", expiry=10.0)
    cache.set("b", b"2", expiry=20.0)
    cache.set("c", b"3")
    assert cache.expire(now=15.0) == 1
    assert sorted(k for k, _ in cache.items()) == ["b", "c"]
    assert cache.expired_total == 1


def test_overwrite_makes_the_old_expiry_stale():
    cache = Cache()
    cache.set("k", b"1", expiry=10.0)
    cache.set("k", b"2", expiry=50.0)  # extended
    assert cache.expire(now=20.0) == 0
    assert value_of(cache.get("k", now=20.0)) == 2
    cache.set("k", b"3")  # no expiry at all now
    assert cache.expire(now=100.0) == 0
    assert value_of(cache.get("k", now=100.0)) == 3


def test_delete_then_set_without_expiry_survives_the_sweep():
    cache = Cache()
    cache.set("k", b"1", expiry=10.0)
    cache.delete("k")
    cache.set("k", b"2")
    assert cache.expire(now=11.0) == 0
    assert value_of(cache.get("k", now=11.0)) == 2


def test_sweep_is_bounded():
    cache = Cache()
    for i in range(50):
        cache.set(f"k{i}", b"1", expiry=1.0)
    assert cache.expire(now=2.0, limit=20) == 20
    assert len(cache) == 30
    assert cache.expire(now=2.0) == 30


def test_byte_accounting_returns_to_zero():
    cache = Cache()
    cache.set("a", b'"x"')
    cache.set("a", b'"a much longer value"')
    cache.set("bb", b"[1,2,3]", expiry=5.0)
    assert cache.bytes > 0
    cache.delete("a")
    cache.expire(now=6.0)
    assert cache.bytes == 0


def test_heap_of_stale_expiries_is_rebuilt():
    cache = Cache()
    for i in range(3000):
        cache.set("k", b"1", expiry=1000.0 + i)
    cache.expire(now=0.0)
    assert len(cache._expiries) <= 4 * max(len(cache), 256)
    assert cache.expire(now=5000.0) == 1


def test_snapshot_and_max_revision():
    cache = Cache()
    cache.set("a", b"1", revision=5)
    cache.set("b", b"2", expiry=10.0, revision=9)
    assert [k for k, _ in cache.snapshot(now=20.0)] == ["a"]
    assert cache.max_revision() == 9


def filled(setup):
    """A cache as each case of put_many finds it."""
    cache = Cache()
    if setup == "held":
        cache.set("b", b'"held before"', 1.9e9, revision=1)
    if setup == "indexed":
        cache.index()
    if setup == "policy":
        cache.uses, cache.new_use, cache.sample_keys = {}, 7, []
    return cache


def state(cache):
    return (
        dict(cache.items()),
        cache.bytes,
        cache.used,
        cache.with_expiry,
        cache.revision,
        sorted(cache._expiries),
        None if cache._index is None else list(cache.index()),
        cache.uses,
        cache.sample_keys,
    )


@pytest.mark.parametrize("setup", ["empty", "held", "indexed", "policy", "repeated"])
def test_put_many_leaves_the_cache_as_puts_one_by_one(setup):
    specs = [
        ("a", b'"alpha"', None, 4),
        ("b", b"[1]", 1.9e9 + 0.5, 9),
        ("clé ü", b'"%b"' % (b"x" * 40_000), None, 6),  # a body counted in whole pages
        ("d", b"2", 1900000000, 5),
    ]
    if setup == "repeated":
        specs.append(("a", b'"again"', None, 8))
    keys = [key for key, *_ in specs]
    entries = [render_entry(render_key(k), v, e, r) for k, v, e, r in specs]
    one_by_one, at_once = filled(setup), filled(setup)
    for key, entry, spec in zip(keys, entries, specs, strict=True):
        one_by_one.put(key, entry, spec[3])
    at_once.put_many(keys, entries, 9)
    assert state(at_once) == state(one_by_one)
    assert at_once.expire(2e9) == one_by_one.expire(2e9) == 2  # the expiry index too
