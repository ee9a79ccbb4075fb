"""Applying other nodes' changes to memory by revision: never going back (dache.store.follow)."""

from twisted.internet.task import Clock

from dache.engines import DELETE, Change
from dache.store.cache import Cache, revision_of, value_of
from dache.store.committer import Committer
from dache.store.follow import FollowedCache
from tests.engines import HeldEngine

NOW = 1_700_000_000.0


def followed():
    clock = Clock()
    clock.advance(NOW)
    cache = Cache()
    return cache, FollowedCache(cache, clock)


def set_(key, value, revision, expiry=None):
    return Change("set", key, value, expiry, revision)


def delete(key, revision):
    return Change(DELETE, key, revision=revision)


def served(cache, key):
    entry = cache.get(key, NOW)
    return None if entry is None else (value_of(entry), revision_of(entry))


def test_an_older_set_or_delete_never_replaces_a_newer_entry():
    cache, follow = followed()
    assert follow.apply(set_("k", b"2", 7))
    assert not follow.apply(set_("k", b"1", 5))  # read before revision 7 was applied
    assert not follow.apply(delete("k", 6))
    assert served(cache, "k") == (2, 7)
    assert follow.apply(delete("k", 8))
    assert served(cache, "k") is None
    assert (follow.applied, follow.left_out) == (2, 2)


def test_a_set_older_than_a_delete_cannot_bring_the_key_back_until_settled():
    cache, follow = followed()
    follow.apply(set_("k", b"1", 3))
    follow.apply(delete("k", 9))
    assert not follow.apply(set_("k", b"1", 5))  # a catch-up that began before the delete
    assert served(cache, "k") is None
    follow.settled(8)
    assert cache.remembered_deletes == 1  # revision 9 could still be overtaken
    follow.settled(9)
    assert cache.remembered_deletes == 0
    assert follow.apply(set_("k", b"3", 10))
    assert served(cache, "k") == (3, 10)


def test_the_nodes_own_deletes_are_remembered_too():
    cache, follow = followed()
    engine = HeldEngine()
    committer = Committer(engine, cache, Clock())
    committer.revision = 20
    committer.submit(Change.delete("k"))
    engine.release()  # this node's own delete, revision 21
    assert cache.remembered_deletes == 1
    assert not follow.apply(set_("k", b"1", 15))  # another node's older set, read late
    assert served(cache, "k") is None
    assert follow.apply(set_("k", b"2", 22))
    assert served(cache, "k") == (2, 22)


def test_the_nodes_own_write_never_replaces_a_newer_entry_from_another_node():
    cache, follow = followed()
    engine = HeldEngine()
    committer = Committer(engine, cache, Clock())
    answered = []
    committer.submit(Change.set("k", b"1")).addCallback(answered.append)
    assert follow.apply(set_("k", b"2", 5))  # another node's, newer, applied first
    engine.release()  # this node's write, revision 1, confirmed late
    assert answered == [1]  # acknowledged
    assert served(cache, "k") == (2, 5)  # memory keeps the newer state


def test_a_set_already_expired_by_this_nodes_clock_deletes_the_older_entry():
    cache, follow = followed()
    follow.apply(set_("k", b"1", 3))
    assert follow.apply(set_("k", b"2", 4, expiry=NOW - 1))
    assert served(cache, "k") is None and "k" not in cache
    assert not follow.apply(set_("k", b"1", 3))  # the delete is remembered at revision 4


def test_a_reload_drops_what_the_snapshot_no_longer_has_and_keeps_what_is_newer():
    cache, follow = followed()
    for revision, key in enumerate("abcd", start=1):
        follow.apply(set_(key, b"1", revision))
    follow.apply(set_("e", b"1", 12))  # written after the reload's snapshot (revision 10)
    follow.apply(delete("f", 11))
    reload = follow.reloading()
    reload.apply(set_("a", b"1", 1))
    reload.apply(set_("b", b"2", 7))  # changed while this node was away
    reload.apply(set_("f", b"1", 6))  # deleted after the snapshot: stays deleted
    assert reload.finish(10) == 2  # c and d were deleted while this node was away
    assert {k: served(cache, k) for k in "abcdef"} == {
        "a": (1, 1),
        "b": (2, 7),
        "c": None,
        "d": None,
        "e": (1, 12),
        "f": None,
    }
    assert cache.remembered_deletes == 1  # f at 11, above the snapshot


def test_a_node_that_follows_no_one_remembers_no_deletes():
    cache, engine = Cache(), HeldEngine()
    committer = Committer(engine, cache, Clock())
    committer.submit(Change.set("k", b"1"))
    engine.release()
    committer.submit(Change.delete("k"))
    engine.release()
    assert cache.remembered_deletes == 0 and len(cache) == 0
