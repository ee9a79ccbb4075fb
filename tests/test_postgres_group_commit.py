"""Group commit on PostgreSQL: concurrent writers share transactions, and order holds."""

import json

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks

from dache.engines import Change
from dache.rendering import render_json
from dache.store.cache import Cache, revision_of, value_of
from dache.store.committer import Committer

WRITERS = 64
WRITES_EACH = 10


@pytest_twisted.inlineCallbacks
def test_64_concurrent_writers_share_few_transactions_and_keep_per_key_order(pg, pg_engine):
    engine = pg_engine(pg)
    yield engine.load(lambda change: None)
    cache = Cache()
    committer = Committer(engine, cache, reactor, write_timeout=60)
    acknowledged = []  # values of the shared key, in the order their writes were acknowledged

    @inlineCallbacks
    def writer(number):
        for i in range(WRITES_EACH):
            # Each writer waits for its previous write, as an HTTP client would.
            yield committer.submit(Change.set(f"own{number}", render_json(i)))
            value = [number, i]
            yield committer.submit(Change.set("shared", render_json(value)))
            acknowledged.append(value)

    yield gatherResults([writer(n) for n in range(WRITERS)])

    requests = WRITERS * WRITES_EACH * 2
    assert committer.changes == requests
    assert engine.transactions == committer.batches
    assert engine.transactions * 8 < requests, (engine.transactions, requests)

    # The shared key holds the last acknowledged write, in memory and in the table.
    rows = pg.rows()
    assert value_of(cache.get("shared", reactor.seconds())) == acknowledged[-1]
    assert json.loads(rows["shared"][0]) == acknowledged[-1]
    for n in range(WRITERS):
        assert value_of(cache.get(f"own{n}", reactor.seconds())) == WRITES_EACH - 1
        assert rows[f"own{n}"][0] == str(WRITES_EACH - 1)
    # Memory and table agree on every revision too.
    revisions = dict(pg.sql("SELECT key, revision FROM dache"))
    assert {k: revision_of(e) for k, e in cache.items()} == revisions
