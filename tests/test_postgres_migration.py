"""Pointing dache at the table of the original dache 0.3.0 migrates it in place."""

import json
from datetime import UTC, datetime, timedelta

import pytest
import pytest_twisted

from dache.engines import Change
from dache.errors import StartupError
from dache.rendering import render_json

STRINGS = {
    "plain": "hello",
    "escapes": 'quote " backslash \\ newline \n tab \t bell \x07',
    "unicode": "é 😀 ☃",
    "empty": "",
    "looks like JSON": '{"a": 1}',
    "number-like": "42",
}


def create_0_3_0_table(pg):
    pg.sql("CREATE TABLE dache (key text primary key, value text, expiry timestamp)")
    now = datetime.now(UTC).replace(tzinfo=None)
    for key, value in STRINGS.items():
        pg.sql("INSERT INTO dache VALUES (%s, %s, NULL)", (key, value))
    # 0.3.0 wrote naive UTC timestamps.
    pg.sql(
        "INSERT INTO dache VALUES ('expires later', 'soon', %s), ('expired', 'old', %s)",
        (now.replace(microsecond=250000) + timedelta(hours=1), now - timedelta(hours=1)),
    )
    return (now.replace(microsecond=250000) + timedelta(hours=1)).replace(tzinfo=UTC).timestamp()


@pytest_twisted.inlineCallbacks
def test_a_0_3_0_table_is_migrated_in_place_keeping_every_entry(pg, pg_engine, logged_errors):
    # A non-UTC session time zone must not shift the naive timestamps.
    pg.sql(f"ALTER DATABASE {pg.name} SET timezone TO 'America/New_York'")
    later = create_0_3_0_table(pg)

    engine = pg_engine(pg)
    loaded = {}
    yield engine.load(lambda change: loaded.__setitem__(change.key, change))

    expected = {key: render_json(value) for key, value in STRINGS.items()}
    assert {k: c.value_json for k, c in loaded.items() if k in STRINGS} == expected
    assert {k: json.loads(c.value_json) for k, c in loaded.items() if k in STRINGS} == STRINGS
    assert loaded["expires later"].value_json == b'"soon"'
    assert loaded["expires later"].expiry == later
    assert "expired" not in loaded  # kept in the table until purged, never served
    assert pg.sql("SELECT value FROM dache WHERE key = 'expired'") == [('"old"',)]
    columns = pg.sql(
        "SELECT column_name, data_type, is_nullable FROM information_schema.columns"
        " WHERE table_name = 'dache' ORDER BY ordinal_position"
    )
    assert columns == [
        ("key", "text", "NO"),
        ("value", "text", "NO"),
        ("expiry", "timestamp with time zone", "YES"),
        ("revision", "bigint", "NO"),
        ("xid", "xid8", "YES"),
    ]
    # Every row got its own revision, and new writes continue the sequence.
    revisions = [r for (r,) in pg.sql("SELECT revision FROM dache")]
    assert len(set(revisions)) == len(STRINGS) + 2
    change = Change.set("new", b"1")
    yield engine.write([change])
    assert change.revision > max(revisions)
    yield engine.close()

    # The second start finds the current shape and changes nothing.
    again = pg_engine(pg)
    reloaded = {}
    yield again.load(lambda change: reloaded.__setitem__(change.key, change))
    assert {k: (c.value_json, c.expiry, c.revision) for k, c in reloaded.items() if k != "new"} == {
        k: (c.value_json, c.expiry, c.revision) for k, c in loaded.items()
    }
    assert logged_errors == []


@pytest_twisted.inlineCallbacks
def test_a_migration_that_fails_halfway_changes_nothing(pg, pg_engine):
    create_0_3_0_table(pg)
    before = pg.sql("SELECT key, value, expiry FROM dache ORDER BY key")
    # A revision sequence that runs out after three rows: the migration fails
    # on the fourth, after it has rewritten values and expiries.
    pg.sql("CREATE SEQUENCE dache_revision MAXVALUE 3")
    with pytest.raises(StartupError) as raised:
        yield pg_engine(pg).load(lambda change: None)
    assert "reached maximum value of sequence" in str(raised.value)
    assert pg.sql("SELECT key, value, expiry FROM dache ORDER BY key") == before
    assert pg.sql(
        "SELECT data_type FROM information_schema.columns"
        " WHERE table_name = 'dache' AND column_name = 'expiry'"
    ) == [("timestamp without time zone",)]

    pg.sql("DROP SEQUENCE dache_revision")  # the operator fixes it; the next start migrates
    loaded = []
    yield pg_engine(pg).load(loaded.append)
    assert len(loaded) == len(STRINGS) + 1
