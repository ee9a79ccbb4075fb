"""
The PostgreSQL engine's table: its shape, the SQL that reads and writes it,
and the in-place migration from the original dache 0.3.0 table.

This module owns the on-database format:

    CREATE TABLE dache (
        key      text PRIMARY KEY,
        value    text NOT NULL,        -- the client's JSON text, byte for byte
        expiry   timestamptz,          -- an instant; NULL: never expires
        revision bigint NOT NULL DEFAULT nextval('dache_revision')
    );
    CREATE INDEX dache_expiry ON dache (expiry) WHERE expiry IS NOT NULL;

Why `text` for the value and not `jsonb`: jsonb reorders keys, drops duplicate
keys and refuses \\u0000, so it would not give a client back what it stored
(and `json` comes back from psycopg2 already parsed). Why `timestamptz`: the
0.3.0 `timestamp` column meant "UTC" only by convention, and read back wrong
under any other session TimeZone. `revision` comes from a sequence in the
writing transaction, so later features (conditional writes, other nodes'
changes) can order changes by it.

The 0.3.0 table was `dache(key text primary key, value text, expiry
timestamp)` holding plain strings: a value "hi" becomes the JSON text "\\"hi\\""
and a naive expiry is read as UTC, in one transaction.
"""

from __future__ import annotations

import re

# A table name, optionally schema-qualified; plain identifiers only, so every
# name derived from it (sequence, index) is one too.
_TABLE_NAME = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_]{0,47}\.)?[A-Za-z_][A-Za-z0-9_]{0,47}")

CURRENT_SHAPE = {
    "key": "text",
    "value": "text",
    "expiry": "timestamp with time zone",
    "revision": "bigint",
}
SHAPE_0_3_0 = {
    "key": "text",
    "value": "text",
    "expiry": "timestamp without time zone",
}


def parse_table_name(text: str) -> str:
    """The POSTGRES_TABLE setting's parser (ValueError: "must be ...")."""
    name = text.strip()
    if not _TABLE_NAME.fullmatch(name):
        raise ValueError(
            "must be a table name of letters, digits and underscores (at most 48), "
            "optionally schema-qualified like cache.dache"
        )
    return name


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class TableSQL:
    """Every statement the engine runs, for one table name."""

    def __init__(self, name: str):
        schema, _, table = name.rpartition(".")
        prefix = quote_ident(schema) + "." if schema else ""
        self.name = name
        self.table = prefix + quote_ident(table)
        self.sequence = prefix + quote_ident(table + "_revision")
        index = quote_ident(table + "_expiry")
        next_revision = f"nextval({quote_literal(self.sequence)}::regclass)"
        regclass = quote_literal(self.table)

        # One writer at a time prepares the table (several nodes may start at once).
        self.lock = f"SELECT pg_advisory_xact_lock(hashtext({quote_literal('dache:' + name)}))"
        self.columns = (
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a"
            f" WHERE a.attrelid = to_regclass({regclass}) AND a.attnum > 0"
            " AND NOT a.attisdropped ORDER BY a.attnum"
        )
        # The upsert needs `key` to be unique on its own.
        self.key_is_unique = (
            "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a"
            " ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]"
            f" WHERE i.indrelid = to_regclass({regclass}) AND i.indisunique"
            " AND i.indnkeyatts = 1 AND i.indpred IS NULL AND a.attname = 'key')"
        )
        self.create = [
            f"CREATE SEQUENCE IF NOT EXISTS {self.sequence}",
            f"CREATE TABLE IF NOT EXISTS {self.table} ("
            " key text PRIMARY KEY,"
            " value text NOT NULL,"
            " expiry timestamptz,"
            f" revision bigint NOT NULL DEFAULT {next_revision})",
            f"ALTER SEQUENCE {self.sequence} OWNED BY {self.table}.revision",
            f"CREATE INDEX IF NOT EXISTS {index} ON {self.table} (expiry) WHERE expiry IS NOT NULL",
            f"COMMENT ON TABLE {self.table} IS "
            + quote_literal(
                "dache entries: value is the client's JSON text exactly; "
                "expiry NULL means never; revision orders changes"
            ),
        ]
        # One ALTER TABLE: one rewrite of the table, inside the caller's transaction.
        self.migrate_0_3_0 = [
            f"CREATE SEQUENCE IF NOT EXISTS {self.sequence}",
            f"ALTER TABLE {self.table}"
            " ALTER COLUMN value TYPE text USING coalesce(to_json(value)::text, 'null'),"
            " ALTER COLUMN value SET NOT NULL,"
            " ALTER COLUMN expiry TYPE timestamptz USING expiry AT TIME ZONE 'UTC',"
            f" ADD COLUMN revision bigint NOT NULL DEFAULT {next_revision}",
            *self.create[2:],
        ]
        self.count = f"SELECT count(*) FROM {self.table}"

        # A batch, as one statement (so one transaction in autocommit mode).
        # Every change gets its own revision, in batch order; the last change
        # per key is the one applied: the sets as one upsert (in key order, so
        # concurrent writers lock rows in one order), the deletes as one DELETE.
        # Parameters: keys, values (NULL for deletes), expiries, is-a-set flags.
        # Answers each change's revision, in batch order.
        self.write = (
            "WITH batch AS MATERIALIZED ("
            f" SELECT k, v, e, is_set, n, {next_revision} AS revision FROM unnest("
            "%s::text[], %s::text[], %s::timestamptz[], %s::boolean[])"
            " WITH ORDINALITY AS b(k, v, e, is_set, n)),"
            " last AS MATERIALIZED (SELECT DISTINCT ON (k) k, v, e, is_set, revision"
            " FROM batch ORDER BY k, n DESC),"
            f" upserted AS (INSERT INTO {self.table} AS t (key, value, expiry, revision)"
            " SELECT k, v, e, revision FROM last WHERE is_set ORDER BY k"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value,"
            " expiry = excluded.expiry, revision = excluded.revision),"
            f" deleted AS (DELETE FROM {self.table}"
            " WHERE key IN (SELECT k FROM last WHERE NOT is_set))"
            " SELECT revision FROM batch ORDER BY n"
        )
        # Rows as the engine hands them on: expiry as exact microseconds.
        row = "key, value, (extract(epoch FROM expiry) * 1000000)::bigint, revision"
        self.declare_live = (
            f"DECLARE dache_load NO SCROLL CURSOR FOR SELECT {row} FROM {self.table}"
            " WHERE expiry IS NULL OR expiry > %s"
        )
        self.fetch_live = "FETCH FORWARD %s FROM dache_load"
        self.select_keys = f"SELECT {row} FROM {self.table} WHERE key = ANY(%s::text[])"
        # Bounded: at most %s rows per statement; SKIP LOCKED keeps out of writers' way.
        # Parameters: now, limit, now. Answers the number of rows deleted.
        self.purge = (
            f"WITH gone AS (DELETE FROM {self.table} WHERE key IN (SELECT key FROM {self.table}"
            " WHERE expiry <= %s LIMIT %s FOR UPDATE SKIP LOCKED) AND expiry <= %s"
            " RETURNING 1) SELECT count(*) FROM gone"
        )


def describe_shape(columns: dict[str, str]) -> str:
    return ", ".join(f"{name} {kind}" for name, kind in columns.items())
