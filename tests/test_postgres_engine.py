"""The PostgreSQL engine against a real PostgreSQL, in-process on the real reactor."""

import time

import pytest
import pytest_twisted

from dache.engines import SET, Change
from dache.engines import postgres as postgres_module
from dache.engines.postgres import settings_from_config
from dache.errors import ConfigError, StartupError


@pytest_twisted.inlineCallbacks
def load(engine):
    loaded = {}
    yield engine.load(lambda change: loaded.__setitem__(change.key, change))
    return loaded


@pytest_twisted.inlineCallbacks
def test_values_come_back_exactly_as_written_and_expiry_as_the_same_instant(pg, pg_engine):
    engine = pg_engine(pg)
    assert (yield load(engine)) == {}
    later = time.time() + 3600.123456789  # finer than PostgreSQL's microseconds
    values = {
        "plain": b'"hello"',
        "key order and duplicates": b'{"b":1,"a":2,"a":3}',
        "escapes": b'"nul \\u0000 tab \\t quote \\" done"',
        "big number": b"123456789012345678901234567890.5e-3",
        "unicode é 😀 / %2F": '["é","😀"]'.encode(),
        " spaces and\nnewlines ": b"null",
    }
    changes = [Change.set(key, value) for key, value in values.items()]
    changes.append(Change.set("expiring", b"1", later))
    yield engine.write(changes)
    assert engine.transactions == 1
    # The engine rounds the expiry to what PostgreSQL keeps, so memory can equal the table.
    assert changes[-1].expiry == round(later * 1_000_000) / 1_000_000
    assert abs(changes[-1].expiry - later) < 1e-6
    yield engine.close()

    again = pg_engine(pg)
    loaded = yield load(again)
    assert {k: c.value_json for k, c in loaded.items()} == {**values, "expiring": b"1"}
    assert loaded["expiring"].expiry == changes[-1].expiry
    assert loaded["plain"].expiry is None
    assert {k: c.revision for k, c in loaded.items()} == {c.key: c.revision for c in changes}
    assert all(c.kind == SET for c in loaded.values())
    assert pg.sql("SELECT value FROM dache WHERE key = 'escapes'") == [
        ('"nul \\u0000 tab \\t quote \\" done"',)
    ]
    yield again.close()


@pytest_twisted.inlineCallbacks
def test_a_batch_is_one_transaction_where_the_last_change_per_key_wins(pg, pg_engine):
    engine = pg_engine(pg)
    yield load(engine)
    first = [Change.set("k", b"0"), Change.set("gone", b"0")]
    yield engine.write(first)
    batch = [
        Change.set("k", b"1"),
        Change.set("k", b"2"),
        Change.delete("k"),
        Change.set("j", b"1"),
        Change.delete("j"),
        Change.set("k", b"3", time.time() + 60),
        Change.delete("gone"),
        Change.delete("never there"),
    ]
    yield engine.write(batch)
    assert engine.transactions == 2
    assert set(pg.rows()) == {"k"}
    assert pg.rows()["k"][0] == "3"
    # Every change gets its own revision from the table's sequence, in batch
    # order (so an ETag names one write), and the row keeps its last change's.
    revisions = [c.revision for c in batch]
    assert revisions == sorted(set(revisions))
    assert revisions[0] > max(c.revision for c in first)
    assert pg.sql("SELECT revision FROM dache WHERE key = 'k'") == [(batch[5].revision,)]
    yield engine.close()


@pytest_twisted.inlineCallbacks
def test_expiry_is_an_instant_whatever_the_session_time_zone(pg, pg_engine):
    pg.sql(f"ALTER DATABASE {pg.name} SET timezone TO 'Pacific/Chatham'")
    engine = pg_engine(pg)
    yield load(engine)
    expiry = 2_000_000_000.25
    yield engine.write([Change.set("k", b"1", expiry)])
    yield engine.close()
    assert pg.sql("SELECT extract(epoch FROM expiry)::float8 FROM dache") == [(expiry,)]
    assert pg.sql("SELECT expiry = '2033-05-18 03:33:20.25+00' FROM dache") == [(True,)]
    loaded = yield load(pg_engine(pg))
    assert loaded["k"].expiry == expiry


@pytest_twisted.inlineCallbacks
def test_load_skips_expired_rows_and_the_purge_deletes_them_in_bounded_batches(
    pg, pg_engine, monkeypatch
):
    engine = pg_engine(pg, postgres_table="cache_entries")
    yield load(engine)
    now = time.time()
    yield engine.write(
        [Change.set(f"old{i}", b"1", now + 3600) for i in range(25)]
        + [Change.set("forever", b"1"), Change.set("later", b"1", now + 3600)]
    )
    yield engine.close()
    pg.sql("UPDATE cache_entries SET expiry = now() - interval '1 second' WHERE key LIKE 'old%'")

    engine = pg_engine(pg, postgres_table="cache_entries")
    engine.purge_batch = 10
    loaded = yield load(engine)
    assert set(loaded) == {"forever", "later"}
    monkeypatch.setattr(postgres_module, "PURGE_ROUNDS", 2)
    assert (yield engine.purge_expired()) == 20  # two statements of ten, then it stops
    assert (yield engine.purge_expired()) == 5
    assert sorted(pg.rows("cache_entries")) == ["forever", "later"]
    assert engine.purged == 25
    yield engine.close()


@pytest_twisted.inlineCallbacks
def test_load_streams_in_chunks(pg, pg_engine):
    pg.sql(
        "CREATE SEQUENCE dache_revision;"
        "CREATE TABLE dache (key text PRIMARY KEY, value text NOT NULL, expiry timestamptz,"
        " revision bigint NOT NULL DEFAULT nextval('dache_revision'))"
    )
    pg.sql("INSERT INTO dache SELECT 'k' || i, i::text, NULL, i FROM generate_series(1, 2500) i")
    engine = pg_engine(pg)
    engine.load_chunk = 1000
    seen = []
    yield engine.load(seen.append)
    assert len(seen) == 2500
    assert {c.key: (c.value_json, c.revision) for c in seen}["k2500"] == (b"2500", 2500)
    yield engine.close()


@pytest_twisted.inlineCallbacks
def test_a_schema_qualified_table(pg, pg_engine):
    pg.sql("CREATE SCHEMA cache")
    engine = pg_engine(pg, postgres_table="cache.entries")
    yield load(engine)
    yield engine.write([Change.set("k", b"1")])
    yield engine.close()
    assert pg.rows("cache.entries") == {"k": ("1", None)}


@pytest_twisted.inlineCallbacks
def test_a_table_of_another_shape_stops_start_up_with_one_line(pg, pg_engine):
    pg.sql("CREATE TABLE dache (key text PRIMARY KEY, hits integer)")
    engine = pg_engine(pg)
    with pytest.raises(StartupError) as raised:
        yield load(engine)
    assert "table dache has columns (key text, hits integer)" in str(raised.value)
    assert "\n" not in str(raised.value)
    yield engine.close()
    assert pg.sql("SELECT count(*) FROM information_schema.columns WHERE table_name = 'dache'") == [
        (2,)
    ]


@pytest_twisted.inlineCallbacks
def test_health_check_is_a_real_round_trip(pg, pg_engine):
    engine = pg_engine(pg)
    yield load(engine)
    health = yield engine.check()
    assert health.ok and "PostgreSQL answered" in health.detail
    assert health.extra["connections"] == 2 and health.extra["transactions"] == 0
    yield engine.close()
    health = yield engine.check()
    assert not health.ok


def test_missing_settings_are_named_one_at_a_time(tmp_path):
    from dache.config import resolve

    base = {"DURABILITY_ENGINE": "postgres"}
    with pytest.raises(ConfigError, match="^POSTGRES_HOST is required for the postgres engine"):
        settings_from_config(resolve({}, base))
    with pytest.raises(ConfigError, match="^POSTGRES_DATABASE is required"):
        settings_from_config(resolve({}, {**base, "POSTGRES_HOST": "db"}))
    full = {**base, "POSTGRES_HOST": "db", "POSTGRES_DATABASE": "d", "POSTGRES_USER": "u"}
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    settings = settings_from_config(resolve({}, {**full, "POSTGRES_PASSWORD_FILE": str(secret)}))
    assert settings.password == "s3cret"
    assert "s3cret" not in repr(settings)
    with pytest.raises(ConfigError, match="not both"):
        settings_from_config(
            resolve({}, {**full, "POSTGRES_PASSWORD_FILE": str(secret), "POSTGRES_PASSWORD": "x"})
        )
    with pytest.raises(ConfigError, match="POSTGRES_PASSWORD_FILE .* cannot be read"):
        settings_from_config(resolve({}, {**full, "POSTGRES_PASSWORD_FILE": str(tmp_path / "no")}))
    with pytest.raises(ConfigError, match="POSTGRES_TABLE must be a table name"):
        resolve({}, {**full, "POSTGRES_TABLE": "dache; DROP TABLE x"})
