"""
Several PostgreSQL engines on one table, in-process on the real reactor: row
locks per key, the watermark, preconditions and range deletes decided in the
transaction, following, the upgrade of a table of an earlier version, and the
purge that one node does.
"""

import time

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.task import deferLater

from dache.engines import ANY, GET, Change, PreconditionFailed
from dache.engines.decide import Group
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
    for i in range(19):
        yield a.submit(Change.set(f"k{i}", str(i).encode()))
    yield a_engine.follower.caught_up()
    # A's own write moves its watermark without being read back.
    read = a_engine.follower.changes
    yield a.submit(Change.set("k19", b"19"))
    yield a_engine.follower.caught_up()
    assert (a_engine.follower.watermark, a_engine.follower.changes) == (20, read)
    yield b.submit(Change.set("from b", b"1"))
    for i in range(0, 20, 3):
        yield a.submit(Change.delete(f"k{i}"))
    yield eventually(lambda: content(b_cache) == content(a_cache) == table_content(pg))
    yield eventually(lambda: a_engine.follower.watermark == b_engine.follower.watermark == 28)
    # The deletes of existing rows left tombstones, at the deletes' revisions.
    tombstones = dict(pg.sql("SELECT key, revision FROM dache_deleted"))
    assert sorted(tombstones) == sorted(f"k{i}" for i in range(0, 20, 3))
    assert sorted(tombstones.values()) == list(range(22, 29))


WAITING = "SELECT count(*) FROM pg_locks WHERE NOT granted"


@pytest_twisted.inlineCallbacks
def test_a_write_waits_only_for_writers_of_its_own_keys(pg, pg_engine):
    engine, cache, committer = yield node(pg_engine, pg)
    assert (yield committer.submit(Change.set("a", b"1"))) == 1
    holder = pg.connect()
    holder.autocommit = False
    # Another writer in progress on the existing key a and on the absent key c.
    holder.cursor().execute(
        "SELECT key FROM dache WHERE key = 'a' FOR UPDATE;"
        "INSERT INTO dache (key, value, revision) VALUES ('c', 'null', 0)"
    )
    assert (yield committer.submit(Change.set("b", b"1"))) == 2  # not held up
    on_a = committer.submit(Change("set", "a", b"2", if_match=(1,)))
    yield eventually(lambda: pg.sql(WAITING) == [(1,)])
    assert not on_a.called
    holder.rollback()
    assert (yield on_a) == 3  # its revision is taken once it holds the row

    holder.cursor().execute("INSERT INTO dache (key, value, revision) VALUES ('c', 'null', 0)")
    on_c = committer.submit(Change.set("c", b"1"))
    yield eventually(lambda: pg.sql(WAITING) == [(1,)])
    assert not on_c.called
    holder.rollback()
    assert (yield on_c) == 4
    holder.close()
    assert table_content(pg) == {"a": (b"2", 3), "b": (b"1", 2), "c": (b"1", 4)}


@pytest_twisted.inlineCallbacks
def test_the_watermark_stays_below_a_revision_whose_transaction_is_open(pg, pg_engine):
    a_engine, a_cache, _ = yield node(pg_engine, pg)
    _, _, b = yield node(pg_engine, pg)
    yield b.submit(Change.set("first", b"1"))
    yield eventually(lambda: a_engine.follower.watermark == 1)
    slow = pg.connect()  # a writer that took revision 2 and has not committed yet
    slow.autocommit = False
    slow.cursor().execute(
        "SELECT pg_advisory_xact_lock_shared(hashtext('dache:dache'));"
        "INSERT INTO dache (key, value, revision, xid)"
        " VALUES ('slow', '2', nextval('dache_revision'), pg_current_xact_id())"
    )
    assert (yield b.submit(Change.set("fast", b"3"))) == 3
    yield eventually(lambda: "fast" in content(a_cache))  # applied at once ...
    yield a_engine.follower.caught_up()
    assert a_engine.follower.watermark == 1  # ... but revision 2 may still commit
    slow.commit()
    slow.close()
    yield a_engine.follower.caught_up()
    assert a_engine.follower.watermark == 3
    assert content(a_cache) == {"first": (b"1", 1), "slow": (b"2", 2), "fast": (b"3", 3)}


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
    assert pg.sql(XID_COLUMNS) == [(2,)]
    # A second start finds everything in place.
    _, again, _ = yield node(pg_engine, pg)
    assert content(again) == {"b": (b"2", 2)}


XID_COLUMNS = (
    "SELECT count(*) FROM pg_attribute WHERE attname = 'xid'"
    " AND attrelid IN ('dache'::regclass, 'dache_deleted'::regclass)"
)


@pytest_twisted.inlineCallbacks
def test_a_table_written_under_the_table_wide_lock_gains_transaction_ids(pg, pg_engine):
    pg.sql(  # as the engine with one advisory lock for every write left it
        "CREATE SEQUENCE dache_revision;"
        "CREATE TABLE dache (key text PRIMARY KEY, value text NOT NULL, expiry timestamptz,"
        " revision bigint NOT NULL DEFAULT nextval('dache_revision'));"
        "ALTER SEQUENCE dache_revision OWNED BY dache.revision;"
        "CREATE INDEX dache_expiry ON dache (expiry) WHERE expiry IS NOT NULL;"
        "CREATE INDEX dache_by_revision ON dache (revision);"
        "CREATE TABLE dache_deleted (key text PRIMARY KEY, revision bigint NOT NULL,"
        " deleted_at timestamptz NOT NULL DEFAULT now());"
        "CREATE INDEX dache_deleted_by_rev ON dache_deleted (revision);"
        "CREATE TABLE dache_meta (one boolean PRIMARY KEY DEFAULT true CHECK (one),"
        " pruned_through bigint NOT NULL DEFAULT 0, purged_at timestamptz);"
        "INSERT INTO dache_meta DEFAULT VALUES;"
        "INSERT INTO dache (key, value) VALUES ('a', '1'), ('b', '2'), ('c', '3');"
        "DELETE FROM dache WHERE key = 'c';"
        "INSERT INTO dache_deleted (key, revision) VALUES ('c', nextval('dache_revision'))"
    )
    a_engine, a_cache, a = yield node(pg_engine, pg)
    assert pg.sql(XID_COLUMNS) == [(2,)]
    _, b_cache, b = yield node(pg_engine, pg)
    assert content(a_cache) == content(b_cache) == {"a": (b"1", 1), "b": (b"2", 2)}
    assert a_engine.follower.watermark == 4
    yield b.submit(Change.delete("a"))
    yield b.submit(Change("set", "b", b"5", if_match=(2,)))  # (decided in the transaction)
    yield eventually(lambda: content(a_cache) == content(b_cache) == table_content(pg))
    yield eventually(lambda: a_engine.follower.watermark == 6)


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


@pytest_twisted.inlineCallbacks
def test_a_range_delete_also_takes_the_keys_this_node_has_not_followed(pg, pg_engine):
    _, a_cache, a = yield node(pg_engine, pg)
    _, stale_cache, stale = yield node(pg_engine, pg, follow=False)  # never learns of A's writes
    for key in ("r1", "r2", "s1"):
        yield a.submit(Change.set(key, b"1"))
    yield stale.submit(Change.set("r3", b"1"))
    group = Group([Change.delete("r3")], prefix="r")  # as DELETE /dache?prefix=r asks it
    yield stale.submit_group(group)
    assert group.extra == 2
    assert sorted(table_content(pg)) == ["s1"]
    assert "r3" not in content(stale_cache)
    # Nothing under the prefix in this node's memory: the group only reads.
    yield a.submit(Change.set("r_4", b"1"))
    yield a.submit(Change.set("rx4", b"1"))  # (LIKE's _ is escaped: not under r_)
    group = Group([Change(GET, "r_")], prefix="r_")
    yield stale.submit_group(group)
    assert group.extra == 1
    assert sorted(table_content(pg)) == ["rx4", "s1"]
    yield eventually(lambda: sorted(content(a_cache)) == ["rx4", "s1"])


@pytest_twisted.inlineCallbacks
def test_a_group_rejected_as_a_whole_beside_a_write_reports_no_made_up_revision(pg, pg_engine):
    _, _, committer = yield node(pg_engine, pg)
    yield committer.submit(Change.set("b", b"0"))
    group = Group(
        [Change.set("a1", b"1"), Change.set("a2", b"1"), Change("set", "b", b"2", if_match=(99,))]
    )
    plain = committer.submit(Change.set("c", b"1"))  # queued with the group: one batch
    failed = committer.submit_group(group)
    failed.addErrback(lambda _: "rejected")
    assert (yield failed) == "rejected"
    assert group.failed == [2]
    assert group.changes[2].revision == 1  # the key's current revision
    assert (yield plain) == 2
    assert sorted(table_content(pg)) == ["b", "c"]
