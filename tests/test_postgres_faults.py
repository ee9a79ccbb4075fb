"""
PostgreSQL failing under the engine, in-process on the real reactor: a
cluster of the tests' own, stopped and started, and backends terminated.
These poll with deadlines (real reconnection over real sockets takes real time).
"""

import time

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.logger import LogLevel, globalLogPublisher

from dache.engines import Change, EngineUnavailable
from dache.errors import StartupError
from dache.store.cache import Cache, value_json_of, value_of
from dache.store.committer import Committer
from dache.store.follow import FollowedCache
from tests.postgres import free_port


def pause(seconds):
    return deferLater(reactor, seconds, lambda: None)


@inlineCallbacks
def eventually(condition, timeout=15.0, step=0.05):
    """Poll condition() on the reactor until it is true; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        yield pause(step)


@inlineCallbacks
def write_outcome(engine, changes):
    """(None, seconds) on success, or (the EngineUnavailable, seconds)."""
    began = time.monotonic()
    try:
        yield engine.write(changes)
    except EngineUnavailable as e:
        return e, time.monotonic() - began
    return None, time.monotonic() - began


def backends(database, state=None):
    query = "SELECT pid FROM pg_stat_activity WHERE datname = %s AND application_name = 'dache'"
    if state:
        query += f" AND state = '{state}'"
    return [pid for (pid,) in database.sql(query, (database.name,))]


@pytest_twisted.inlineCallbacks
def test_writes_fail_fast_while_postgres_is_down_then_resume_on_their_own(
    own_postgres, own_pg, pg_engine, logged_errors
):
    engine = pg_engine(own_pg)
    cache = Cache()
    yield engine.load(lambda change: None)
    committer = Committer(engine, cache, reactor, write_timeout=2.0)
    yield committer.submit(Change.set("before", b"1"))

    own_postgres.stop("immediate")
    yield eventually(lambda: not engine.available)
    for i in range(3):
        error, seconds = yield write_outcome(engine, [Change.set(f"during{i}", b"1")])
        assert isinstance(error, EngineUnavailable) and "unreachable" in str(error)
        assert seconds < 0.5  # refused at once, not after a timeout
    with pytest.raises(EngineUnavailable):
        yield committer.submit(Change.set("before", b"changed while down"))
    assert value_of(cache.get("before", reactor.seconds())) == 1  # a failed write changes nothing
    health = yield engine.check()
    assert not health.ok and health.extra["connections"] == 0

    own_postgres.start()
    yield eventually(lambda: engine.available, timeout=10)
    yield committer.submit(Change.set("after", b"2"))
    assert {k: value_json_of(e) for k, e in cache.items()} == {"before": b"1", "after": b"2"}
    assert {k: v for k, (v, _) in own_pg.rows().items()} == {"before": "1", "after": "2"}
    yield eventually(lambda: engine.pool.alive == 2)
    assert logged_errors == []


@pytest_twisted.inlineCallbacks
def test_idle_connections_killed_under_the_engine_reconnect_without_logging_errors(
    pg, pg_engine, logged_errors
):
    engine = pg_engine(pg)
    yield engine.load(lambda change: None)
    killed = backends(pg)
    assert len(killed) == 2
    pg.sql("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (killed,))
    # Two new backends, and the engine knows its connections are up again.
    yield eventually(lambda: len(set(backends(pg)) - set(killed)) == 2 and engine.pool.alive == 2)
    yield engine.write([Change.set("k", b"1")])
    assert pg.rows() == {"k": ("1", None)}
    assert logged_errors == []


@pytest.mark.parametrize("interruption", ["pg_terminate_backend", "pg_cancel_backend"])
@pytest_twisted.inlineCallbacks
def test_a_write_interrupted_mid_statement_is_retried(pg, pg_engine, interruption, logged_errors):
    engine = pg_engine(pg)
    yield engine.load(lambda change: None)
    yield engine.write([Change.set("k", b"1")])
    locker = pg.connect()
    locker.autocommit = False
    locker.cursor().execute("SELECT * FROM dache WHERE key = 'k' FOR UPDATE")
    written = engine.write([Change.set("k", b"2")])  # waits for the row lock
    yield eventually(lambda: len(backends(pg, "active")) == 1)
    first = backends(pg, "active")[0]
    pg.sql(f"SELECT {interruption}(%s)", (first,))
    # The retry (on the other connection if this one died), waiting for the lock too.
    yield eventually(lambda: len(backends(pg, "active")) == 1 and engine._in_doubt)
    locker.rollback()
    yield written
    assert pg.rows()["k"][0] == "2"
    assert engine.transactions == 2 and not engine._in_doubt
    locker.close()
    assert logged_errors == []


@pytest_twisted.inlineCallbacks
def test_a_write_of_unknown_outcome_is_resolved_from_the_table(pg, pg_engine):
    engine = pg_engine(pg, postgres_pool_size=1)
    cache = Cache()
    engine.follow(FollowedCache(cache, reactor))
    yield engine.load(lambda change: None)
    committer = Committer(engine, cache, reactor, write_timeout=30)
    yield committer.submit(Change.set("k", b"1"))

    locker = pg.connect()
    locker.autocommit = False
    locker.cursor().execute(  # another writer, with a revision of its own
        "UPDATE dache SET value = '\"elsewhere\"', revision = nextval('dache_revision')"
        " WHERE key = 'k'"
    )
    written = committer.submit(Change.set("k", b"2"))  # waits for the row lock
    yield eventually(lambda: len(backends(pg, "active")) == 1)
    pg.sql("SELECT pg_terminate_backend(%s)", (backends(pg, "active")[0],))
    with pytest.raises(EngineUnavailable, match="may not have been made"):
        yield written
    locker.commit()  # the table now holds a value memory has never seen
    locker.close()

    yield eventually(lambda: engine.available)
    yield eventually(lambda: value_of(cache.get("k", reactor.seconds())) == "elsewhere")
    yield committer.submit(Change.set("other", b"3"))
    assert {k: value_json_of(e).decode() for k, e in cache.items()} == {
        k: v for k, (v, _) in pg.rows().items()
    }


@pytest_twisted.inlineCallbacks
def test_cancelling_a_write_does_not_reach_txpostgres(pg, pg_engine, logged_errors):
    engine = pg_engine(pg)
    yield engine.load(lambda change: None)
    d = engine.write([Change.set("k", b"1")])
    d.cancel()
    d.addErrback(lambda _: None)
    yield eventually(lambda: engine.transactions == 1)
    assert pg.rows() == {"k": ("1", None)}
    yield engine.write([Change.set("k", b"2")])
    assert logged_errors == []


@pytest_twisted.inlineCallbacks
def test_unreachable_at_start_retries_with_backoff_then_gives_up_with_one_line(pg, pg_engine):
    warnings = []

    def observe(event):
        if event.get("log_level") == LogLevel.warn:
            warnings.append(event["log_format"].format(**event))

    globalLogPublisher.addObserver(observe)
    try:
        engine = pg_engine(
            pg,
            postgres_host="127.0.0.1",
            postgres_port=free_port(),
            postgres_connect_timeout=1.5,
        )
        with pytest.raises(StartupError) as raised:
            yield engine.load(lambda change: None)
    finally:
        globalLogPublisher.removeObserver(observe)
    message = str(raised.value)
    assert message.startswith("could not connect to PostgreSQL at postgres@127.0.0.1:")
    assert "within 1.5s (POSTGRES_CONNECT_TIMEOUT)" in message and "\n" not in message
    attempts = [w for w in warnings if "is not reachable (attempt" in w]
    assert len(attempts) >= 3  # each attempt logged, with growing delays
    assert "attempt 1)" in attempts[0] and "attempt 2)" in attempts[1]


@pytest_twisted.inlineCallbacks
def test_start_up_waits_for_postgres_to_come_up(own_postgres, own_pg, pg_engine):
    own_postgres.stop("fast")
    engine = pg_engine(own_pg, postgres_connect_timeout=30)
    loaded = engine.load(lambda change: None)
    yield pause(0.5)
    assert not loaded.called
    own_postgres.start()
    yield loaded
    yield engine.write([Change.set("k", b"1")])
    assert own_pg.rows() == {"k": ("1", None)}
