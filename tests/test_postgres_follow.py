"""
Several PostgreSQL engines on one table, in-process on the real reactor: the
write lock, preconditions decided in the transaction, following, the upgrade
of a table of the previous version, and the purge that one node does.
"""

import time

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.task import deferLater

from dache.engines import ANY, Change, PreconditionFailed
from dache.store.cache import Cache, revision_of, value_json_of
from dache.store.committer import Committer
from dache.store.follow import FollowedCache


@inlineCallbacks
def eventually(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        yield deferLater(reactor, 0.02, lambda: None)


@inlineCallbacks
def node(pg_engine, pg, follow=True, **settings):
    """A node's engine, cache and committer (without HTTP)."""
    engine = pg_engine(pg, **settings)
    cache = Cache()
    if follow:
        engine.follow(FollowedCache(cache, reactor))
    yield engine.load(lambda c: cache.set(c.key, c.value_json, c.expiry, c.revision))
    if follow:
        yield engine.follower.caught_up()
    return engine, cache, Committer(engine, cache, reactor, write_timeout=10)


def content(cache):
    return {k: (value_json_of(e), revision_of(e)) for k, e in cache.items()}


def table_content(pg):
    rows = pg.sql("SELECT key, value, revision FROM dache")
    return {key: (value.encode(), revision) for key, value, revision in rows}


@inlineCallbacks
def outcome(d):
    try:
        return (yield d)
    except PreconditionFailed as e:
        return ("412", e.current_revision)


@pytest_twisted.inlineCallbacks
def test_a_node_follows_the_sets_and_deletes_of_another(pg, pg_engine):
    a_engine, a_cache, a = yield node(pg_engine, pg)
    b_engine, b_cache, b = yield node(pg_engine, pg)
    for i in range(20):
        yield a.submit(Change.set(f"k{i}", str(i).encode()))
    # A's own writes moved its watermark without reading them back.
    assert (a_engine.follower.watermark, a_engine.follower.changes) == (20, 0)
    yield b.submit(Change.set("from b", b"1"))
    for i in range(0, 20, 3):
        yield a.submit(Change.delete(f"k{i}"))
    yield eventually(lambda: content(b_cache) == content(a_cache) == table_content(pg))
    yield eventually(lambda: a_engine.follower.watermark == b_engine.follower.watermark == 28)
    # The deletes of existing rows left tombstones, at the deletes' revisions.
    tombstones = dict(pg.sql("SELECT key, revision FROM dache_deleted"))
    assert sorted(tombstones) == sorted(f"k{i}" for i in range(0, 20, 3))
    assert sorted(tombstones.values()) == list(range(22, 29))


@pytest_twisted.inlineCallbacks
def test_writes_wait_for_the_tables_lock_so_revisions_commit_in_order(pg, pg_engine):
    engine, cache, committer = yield node(pg_engine, pg)
    holder = pg.connect()
    holder.autocommit = False
    holder.cursor().execute("SELECT pg_advisory_xact_lock(hashtext('dache:dache'))")
    plain = committer.submit(Change.set("a", b"1"))
    waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
    yield eventually(lambda: pg.sql(waiting) == [(1,)])
    assert not plain.called
    holder.rollback()
    assert (yield plain) == 1

    holder.cursor().execute("SELECT pg_advisory_xact_lock(hashtext('dache:dache'))")
    conditional = committer.submit(Change("set", "a", b"2", if_match=(1,)))
    yield eventually(lambda: pg.sql(waiting) == [(1,)])
    holder.rollback()
    assert (yield conditional) == 2
    holder.close()


@pytest_twisted.inlineCallbacks
def test_preconditions_are_decided_against_the_table_not_this_nodes_memory(pg, pg_engine):
    _, _, a = yield node(pg_engine, pg)
    _, stale_cache, stale = yield node(pg_engine, pg, follow=False)  # never learns of A's writes
    revision = yield a.submit(Change.set("k", b"1"))
    assert stale_cache.get("k", time.time()) is None

    assert (yield outcome(stale.submit(Change("set", "k", b"2", if_none_match=ANY)))) == (
        "412",
        revision,
    )
    taken = yield stale.submit(Change("set", "k", b"3", if_match=(revision,)))
    assert taken > revision
    assert (yield outcome(a.submit(Change("set", "k", b"4", if_match=(revision,))))) == (
        "412",
        taken,
    )
    assert table_content(pg)["k"] == (b"3", taken)

    # In one batch (queued behind a write in flight), a precondition sees the
    # batch's earlier changes.
    batches = stale.batches
    stale.submit(Change.set("other", b"0"))
    batch = [
        Change.set("new", b"1"),
        Change("set", "new", b"2", if_none_match=ANY),
        Change("delete", "new", if_match=ANY),
    ]
    results = yield gatherResults([outcome(stale.submit(change)) for change in batch])
    assert stale.batches == batches + 2
    assert results[1] == ("412", results[0])  # the ETag the first one got
    assert results[2] == results[0] + 1
    assert "new" not in table_content(pg)


@pytest_twisted.inlineCallbacks
def test_an_entry_expired_by_this_nodes_clock_is_absent_for_preconditions(pg, pg_engine):
    _, _, committer = yield node(pg_engine, pg)
    revision = yield committer.submit(Change.set("k", b"1", time.time() + 0.2))
    yield deferLater(reactor, 0.3, lambda: None)
    assert (yield outcome(committer.submit(Change("set", "k", b"2", if_match=(revision,))))) == (
        "412",
        None,
    )
    assert (yield committer.submit(Change("set", "k", b"3", if_none_match=ANY))) > revision


@pytest_twisted.inlineCallbacks
def test_a_table_of_the_previous_version_is_upgraded_in_place(pg, pg_engine):
    pg.sql(  # as the PostgreSQL engine before following created it
        "CREATE SEQUENCE dache_revision;"
        "CREATE TABLE dache (key text PRIMARY KEY, value text NOT NULL, expiry timestamptz,"
        " revision bigint NOT NULL DEFAULT nextval('dache_revision'));"
        "ALTER SEQUENCE dache_revision OWNED BY dache.revision;"
        "CREATE INDEX dache_expiry ON dache (expiry) WHERE expiry IS NOT NULL;"
        "INSERT INTO dache (key, value) VALUES ('a', '1'), ('b', '2')"
    )
    engine, cache, committer = yield node(pg_engine, pg)
    assert content(cache) == {"a": (b"1", 1), "b": (b"2", 2)}
    yield committer.submit(Change.delete("a"))
    assert pg.sql("SELECT key, revision FROM dache_deleted") == [("a", 3)]
    indexes = pg.sql("SELECT indexname FROM pg_indexes WHERE tablename LIKE 'dache%'")
    assert {"dache_by_revision", "dache_deleted_by_rev"} <= {name for (name,) in indexes}
    assert pg.sql("SELECT pruned_through FROM dache_meta") == [(0,)]
    # A second start finds everything in place.
    _, again, _ = yield node(pg_engine, pg)
    assert content(again) == {"b": (b"2", 2)}


@pytest_twisted.inlineCallbacks
def test_one_node_purges_per_interval_and_old_tombstones_go_with_it(pg, pg_engine):
    settings = {"postgres_purge_interval": 60, "postgres_tombstone_retention": 0.1}
    a_engine, _, a = yield node(pg_engine, pg, **settings)
    b_engine, _, _ = yield node(pg_engine, pg, **settings)
    for key in "abcd":
        yield a.submit(Change.set(key, b"1", time.time() + 3600))
    yield a.submit(Change.delete("d"))
    pg.sql("UPDATE dache SET expiry = now() - interval '1 second' WHERE key IN ('a', 'b')")
    yield deferLater(reactor, 0.15, lambda: None)  # the tombstone of d is past the retention

    yield a_engine._purge_if_due()
    assert (a_engine.purged, a_engine.pruned) == (2, 1)
    assert pg.sql("SELECT pruned_through FROM dache_meta") == [(5,)]
    pg.sql("UPDATE dache SET expiry = now() - interval '1 second' WHERE key = 'c'")
    yield b_engine._purge_if_due()  # A purged less than half an interval ago
    assert b_engine.purged == 0
    assert sorted(k for (k,) in pg.sql("SELECT key FROM dache")) == ["c"]
