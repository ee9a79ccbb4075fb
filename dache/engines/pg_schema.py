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

Several nodes on one table follow each other's changes (pg_follow), which needs:

    CREATE INDEX dache_by_revision ON dache (revision);
    CREATE TABLE dache_deleted (            -- tombstones: deletes, for followers
        key        text PRIMARY KEY,
        revision   bigint NOT NULL,         -- the delete's revision
        deleted_at timestamptz NOT NULL DEFAULT now());
    CREATE INDEX dache_deleted_by_rev ON dache_deleted (revision);
    CREATE TABLE dache_meta (               -- one row
        one            boolean PRIMARY KEY DEFAULT true CHECK (one),
        pruned_through bigint NOT NULL DEFAULT 0,  -- highest tombstone revision pruned
        purged_at      timestamptz);        -- when a node last purged (one purge per interval)

Every write transaction takes the table's advisory lock before it takes
revisions (so revisions commit in order, and a follower reading "revision >
N" never skips one that commits late) and notifies the table's channel with
its highest revision. The sequence must keep CACHE 1 (the default): cached
values would hand revisions out of commit order. The auxiliary objects are
created on start when missing, so a table of the previous version upgrades
in place.
"""

from __future__ import annotations

import hashlib
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
        self.tombstones = prefix + quote_ident(table + "_deleted")
        self.meta = prefix + quote_ident(table + "_meta")
        by_revision = quote_ident(table + "_by_revision")
        tombstones_by_revision = quote_ident(table + "_deleted_by_rev")
        self.sequence = prefix + quote_ident(table + "_revision")
        index = quote_ident(table + "_expiry")
        next_revision = f"nextval({quote_literal(self.sequence)}::regclass)"
        regclass = quote_literal(self.table)

        # One writer at a time prepares the table (several nodes may start at once),
        # and writes it: revisions are taken under this lock, so they commit in order.
        self.lock = f"SELECT pg_advisory_xact_lock(hashtext({quote_literal('dache:' + name)}))"
        # Where writers announce their highest revision (a wake-up for followers).
        self.channel = channel_name(name)
        self.listen = f"LISTEN {quote_ident(self.channel)}"
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

        # What following other nodes needs (see the module docstring); created
        # when missing, inside the preparing transaction.
        self.followed_objects = (
            f"SELECT to_regclass({quote_literal(self.tombstones)}) IS NOT NULL"
            f" AND to_regclass({quote_literal(self.meta)}) IS NOT NULL"
            f" AND to_regclass({quote_literal(prefix + by_revision)}) IS NOT NULL"
            f" AND to_regclass({quote_literal(prefix + tombstones_by_revision)}) IS NOT NULL"
        )
        self.create_followed = [
            f"CREATE INDEX IF NOT EXISTS {by_revision} ON {self.table} (revision)",
            f"CREATE TABLE IF NOT EXISTS {self.tombstones} ("
            " key text PRIMARY KEY,"
            " revision bigint NOT NULL,"
            " deleted_at timestamptz NOT NULL DEFAULT now())",
            f"CREATE INDEX IF NOT EXISTS {tombstones_by_revision} ON {self.tombstones} (revision)",
            f"COMMENT ON TABLE {self.tombstones} IS "
            + quote_literal(
                f"dache: deletes from {name}, so other nodes see them; pruned after "
                "POSTGRES_TOMBSTONE_RETENTION"
            ),
            f"CREATE TABLE IF NOT EXISTS {self.meta} ("
            " one boolean PRIMARY KEY DEFAULT true CHECK (one),"
            " pruned_through bigint NOT NULL DEFAULT 0,"
            " purged_at timestamptz)",
            f"INSERT INTO {self.meta} DEFAULT VALUES ON CONFLICT DO NOTHING",
        ]

        # A batch, once the caller holds the lock. Every change gets its own
        # revision, in batch order; the last change per key is the one applied:
        # the sets as one upsert (in key order, so concurrent writers lock rows
        # in one order), the deletes as one DELETE whose deleted rows leave
        # tombstones; the highest revision is notified (delivered on commit).
        # Parameters: keys, values (NULL for deletes), expiries, is-a-set flags.
        # Answers each change's revision, in batch order.
        self.write_locked = (
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
            " WHERE key IN (SELECT k FROM last WHERE NOT is_set) RETURNING key),"
            f" tombstoned AS (INSERT INTO {self.tombstones} AS d (key, revision)"
            " SELECT l.k, l.revision FROM last l JOIN deleted ON deleted.key = l.k ORDER BY l.k"
            " ON CONFLICT (key) DO UPDATE SET revision = excluded.revision,"
            " deleted_at = excluded.deleted_at),"
            " notified AS MATERIALIZED (SELECT"
            f" pg_notify({quote_literal(self.channel)}, max(revision)::text) FROM batch)"
            " SELECT revision FROM batch CROSS JOIN notified ORDER BY n"
        )
        # The same as one round trip: a query string of several statements is
        # one transaction, and each statement sees what committed before it ran
        # (so the write runs after the lock is granted).
        self.write = f"{self.lock}; {self.write_locked}"
        # Under the lock: the revision the sequence handed out last (key NULL),
        # and the current rows of the keys a batch decides on (preconditions,
        # read-modify-writes, reads in a transaction: see dache.engines.decide).
        self.current = (
            "SELECT NULL::text, (SELECT CASE WHEN is_called THEN last_value"
            f" ELSE last_value - 1 END FROM {self.sequence}), NULL::bigint, NULL::text"
            " UNION ALL SELECT key, revision, (extract(epoch FROM expiry) * 1000000)::bigint,"
            f" value FROM {self.table} WHERE key = ANY(%s::text[])"
        )
        # Rows as the engine hands them on: expiry as exact microseconds.
        row = "key, value, (extract(epoch FROM expiry) * 1000000)::bigint, revision"
        row_named = "key, value, (extract(epoch FROM expiry) * 1000000)::bigint AS micros, revision"
        self.declare_live = (
            f"DECLARE dache_load NO SCROLL CURSOR FOR SELECT {row} FROM {self.table}"
            " WHERE expiry IS NULL OR expiry > %s"
        )
        self.fetch_live = "FETCH FORWARD %s FROM dache_load"
        # In the load's snapshot (REPEATABLE READ): every change up to this
        # revision is in it. pruned_through counts: tombstones up to it are gone.
        self.snapshot_revision = (
            f"SELECT greatest((SELECT max(revision) FROM {self.table}),"
            f" (SELECT max(revision) FROM {self.tombstones}),"
            f" (SELECT pruned_through FROM {self.meta}), 0)"
        )
        # Every change above a revision, oldest first, at most `limit`: rows
        # (sets) and tombstones (deletes, value NULL); and, in the same snapshot,
        # pruned_through (always one row, so it is read even with no changes).
        self.changes_since = (
            "SELECT m.pruned_through, c.key, c.value, c.micros, c.revision FROM"
            f" (SELECT coalesce((SELECT pruned_through FROM {self.meta}), 0)"
            " AS pruned_through) m LEFT JOIN LATERAL ("
            f" (SELECT {row_named} FROM {self.table} WHERE revision > %(since)s"
            " ORDER BY revision LIMIT %(limit)s)"
            " UNION ALL"
            " (SELECT key, NULL, NULL, revision"
            f" FROM {self.tombstones} WHERE revision > %(since)s"
            " ORDER BY revision LIMIT %(limit)s)"
            " ORDER BY revision LIMIT %(limit)s) c ON true ORDER BY c.revision"
        )
        # Bounded: at most %s rows per statement; SKIP LOCKED keeps out of writers' way.
        # Parameters: now, limit, now. Answers the number of rows deleted.
        # A row goes once both the node's clock and the database's have passed
        # its expiry: a node whose clock runs ahead must not take an entry
        # from nodes (re)loading the table while it is still live for them.
        self.purge = (
            f"WITH gone AS (DELETE FROM {self.table} WHERE key IN (SELECT key FROM {self.table}"
            " WHERE expiry <= least(%s, now()) LIMIT %s FOR UPDATE SKIP LOCKED)"
            " AND expiry <= least(%s, now()) RETURNING 1) SELECT count(*) FROM gone"
        )
        # One purge per interval for all nodes: the node whose claim updates
        # the row purges. Parameter: seconds that must have passed since the last.
        self.claim_purge = (
            f"UPDATE {self.meta} SET purged_at = now()"
            " WHERE purged_at IS NULL OR purged_at <= now() - make_interval(secs => %s)"
            " RETURNING true"
        )
        # Tombstones older than the retention go, at most %s per statement, and
        # pruned_through records the highest revision pruned: a follower behind
        # it may have missed a delete, so it reloads.
        # Parameters: retention seconds, limit, retention seconds.
        self.prune = (
            f"WITH gone AS (DELETE FROM {self.tombstones} WHERE key IN (SELECT key"
            f" FROM {self.tombstones} WHERE deleted_at < now() - make_interval(secs => %s)"
            " LIMIT %s FOR UPDATE SKIP LOCKED)"
            " AND deleted_at < now() - make_interval(secs => %s) RETURNING revision),"
            f" noted AS (UPDATE {self.meta} SET pruned_through ="
            " greatest(pruned_through, (SELECT max(revision) FROM gone))"
            " WHERE EXISTS (SELECT 1 FROM gone))"
            " SELECT count(*) FROM gone"
        )


def channel_name(table: str) -> str:
    """The NOTIFY channel of a table (an identifier: at most 63 bytes)."""
    channel = f"dache:{table}"
    if len(channel) > 63:
        channel = "dache:" + hashlib.sha1(table.encode("utf-8")).hexdigest()[:32]
    return channel


def describe_shape(columns: dict[str, str]) -> str:
    return ", ".join(f"{name} {kind}" for name, kind in columns.items())
