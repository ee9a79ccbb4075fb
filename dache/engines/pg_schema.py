"""
The PostgreSQL engine's table: its shape, the SQL that reads and writes it,
and the in-place migration from the original dache 0.3.0 table.

This module owns the on-database format:

    CREATE TABLE dache (
        key      text PRIMARY KEY,
        value    text NOT NULL,        -- the client's JSON text, byte for byte
        expiry   timestamptz,          -- an instant; NULL: never expires
        revision bigint NOT NULL DEFAULT nextval('dache_revision'),
        xid      xid8                  -- the writing transaction (pg_current_xact_id())
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
        deleted_at timestamptz NOT NULL DEFAULT now(),
        xid        xid8);                   -- the deleting transaction
    CREATE INDEX dache_deleted_by_rev ON dache_deleted (revision);
    CREATE TABLE dache_meta (               -- one row
        one            boolean PRIMARY KEY DEFAULT true CHECK (one),
        pruned_through bigint NOT NULL DEFAULT 0,  -- highest tombstone revision pruned
        purged_at      timestamptz);        -- when a node last purged (one purge per interval)

No write takes a table-wide lock. A write transaction locks its keys' rows
in key order first (an absent key gets a placeholder row, revision 0, that
the same transaction overwrites or removes: so two writers of one key, present
or not, queue on its row), and only then takes revisions from the sequence: a
key's revisions therefore commit in the order they were taken. Revisions of
different keys may commit out of order (and aborted writes leave gaps), so a
follower finds "every change up to N" from each row's writing transaction
(`xid`) and the snapshots it reads in (see pg_follow). Writers hold the
table's advisory lock in shared mode (they never wait for each other on it);
a node loading the table takes it exclusively for the instant its snapshot
starts, so no write is in progress in that snapshot. The auxiliary objects
and the xid columns are added on start when missing, so a table of a
previous version upgrades in place.
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
    "xid": "xid8",
}
# Before writes recorded their transaction (one table-wide write lock): no xid column.
SHAPE_REVISION = {name: kind for name, kind in CURRENT_SHAPE.items() if name != "xid"}
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

        # The table's advisory lock. Taken exclusively: one node at a time prepares
        # the table (several may start at once), and a node's load or reload
        # starts its snapshot with no write in progress. Every write holds it
        # shared (writers never wait for each other on it).
        lock_key = f"hashtext({quote_literal('dache:' + name)})"
        self.lock = f"SELECT pg_advisory_xact_lock({lock_key})"
        self.fence = f"SELECT pg_advisory_lock({lock_key})"  # session-level: see pg_follow
        self.unfence = f"SELECT pg_advisory_unlock({lock_key})"
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
            f" revision bigint NOT NULL DEFAULT {next_revision},"
            " xid xid8)",
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
            f" ADD COLUMN revision bigint NOT NULL DEFAULT {next_revision},"
            " ADD COLUMN xid xid8",
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
            " AND (SELECT count(*) FROM pg_attribute WHERE attname = 'xid' AND NOT attisdropped"
            " AND attrelid IN"
            f" (to_regclass({regclass}), to_regclass({quote_literal(self.tombstones)}))) = 2"
        )
        self.create_followed = [
            f"CREATE INDEX IF NOT EXISTS {by_revision} ON {self.table} (revision)",
            f"CREATE TABLE IF NOT EXISTS {self.tombstones} ("
            " key text PRIMARY KEY,"
            " revision bigint NOT NULL,"
            " deleted_at timestamptz NOT NULL DEFAULT now(),"
            " xid xid8)",
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
            # A table from before writes recorded their transaction: a nullable
            # column without a default, so adding it rewrites nothing.
            f"ALTER TABLE {self.table} ADD COLUMN IF NOT EXISTS xid xid8",
            f"ALTER TABLE {self.tombstones} ADD COLUMN IF NOT EXISTS xid xid8",
        ]

        # First in every write transaction: lock the batch's keys' rows, in key
        # order (so writers of overlapping batches cannot deadlock), before any
        # revision is taken. An absent key gets a placeholder row (revision 0,
        # invisible to others until commit, overwritten or removed by the
        # write), so a concurrent writer of that key queues on it as on a row.
        # DO UPDATE ... WHERE false locks an existing row without changing it.
        # Parameter: the keys. Answers the keys that got a placeholder.
        lock_keys = (
            f"WITH fence AS MATERIALIZED (SELECT pg_advisory_xact_lock_shared({lock_key}))"
            f" INSERT INTO {self.table} AS t (key, value, revision)"
            " SELECT k, 'null', 0 FROM fence, unnest(%s::text[]) AS u(k) ORDER BY k"
            " ON CONFLICT (key) DO UPDATE SET revision = t.revision WHERE false RETURNING key"
        )
        # A batch, once its keys are locked. Every change gets its own revision,
        # in batch order; the last change per key is the one applied: the sets
        # as one upsert, the deletes as one DELETE whose deleted rows (not
        # placeholders) leave tombstones; placeholders of keys the batch did not
        # write go too. Every row written records the transaction. The highest
        # revision is notified (delivered on commit).
        # Parameters: keys, values (NULL for deletes), expiries, is-a-set flags,
        # keys whose placeholders go unwritten. Answers each change's revision,
        # in batch order, and the transaction's id.
        write_locked = (
            "WITH batch AS MATERIALIZED ("
            f" SELECT k, v, e, is_set, n, {next_revision} AS revision FROM unnest("
            "%s::text[], %s::text[], %s::timestamptz[], %s::boolean[])"
            " WITH ORDINALITY AS b(k, v, e, is_set, n)),"
            " last AS MATERIALIZED (SELECT DISTINCT ON (k) k, v, e, is_set, revision"
            " FROM batch ORDER BY k, n DESC),"
            f" upserted AS (INSERT INTO {self.table} AS t (key, value, expiry, revision, xid)"
            " SELECT k, v, e, revision, pg_current_xact_id() FROM last WHERE is_set ORDER BY k"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value,"
            " expiry = excluded.expiry, revision = excluded.revision, xid = excluded.xid),"
            f" deleted AS (DELETE FROM {self.table} WHERE key = ANY(ARRAY("
            "SELECT k FROM last WHERE NOT is_set UNION ALL SELECT unnest(%s::text[])))"
            " RETURNING key, revision),"
            f" tombstoned AS (INSERT INTO {self.tombstones} AS d (key, revision, xid)"
            " SELECT l.k, l.revision, pg_current_xact_id() FROM last l"
            " JOIN deleted ON deleted.key = l.k WHERE deleted.revision > 0 ORDER BY l.k"
            " ON CONFLICT (key) DO UPDATE SET revision = excluded.revision,"
            " deleted_at = excluded.deleted_at, xid = excluded.xid),"
            " notified AS MATERIALIZED (SELECT"
            f" pg_notify({quote_literal(self.channel)}, max(revision)::text) FROM batch)"
            " SELECT revision, pg_current_xact_id()::text FROM batch CROSS JOIN notified ORDER BY n"
        )
        self.lock_keys = "EXECUTE dache_lock_keys(%s::text[])"
        self.write_locked = (
            "EXECUTE dache_write(%s::text[], %s::text[], %s::timestamptz[], %s::boolean[],"
            " %s::text[])"
        )
        # The same as one round trip: a query string of several statements is
        # one transaction, and each statement sees what committed before it ran
        # (so the write runs once the keys are locked).
        # Parameters: the keys (sorted, distinct), then write_locked's.
        self.write = f"{self.lock_keys}; {self.write_locked}"
        # Once locked: the current rows of the keys a batch decides on
        # (preconditions, read-modify-writes, reads in a transaction, range
        # deletes: see dache.engines.decide), placeholders left out.
        self.current = (
            "SELECT key, revision, (extract(epoch FROM expiry) * 1000000)::bigint, value"
            f" FROM {self.table} WHERE key = ANY(%s::text[]) AND revision > 0"
        )
        # A range delete's keys as the table has them now (LIKE patterns; the
        # primary key's index serves them under the C collation).
        self.keys_like = (
            f"SELECT key FROM {self.table} WHERE key LIKE ANY(%s::text[]) AND revision > 0"
        )
        # Placeholders of a batch that wrote nothing.
        self.drop_placeholders = (
            f"DELETE FROM {self.table} WHERE key = ANY(%s::text[]) AND revision = 0"
        )
        # Rows as the engine hands them on: expiry as exact microseconds.
        row = "key, value, (extract(epoch FROM expiry) * 1000000)::bigint, revision"
        row_named = "key, value, (extract(epoch FROM expiry) * 1000000)::bigint AS micros, revision"
        tombstone_row = "key, NULL AS value, NULL::bigint AS micros, revision"
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
        # A follower's catch-up, in one snapshot (see pg_follow for why this is
        # exact): that snapshot's in-progress transactions, the highest
        # revision it holds, pruned_through; and the changes (rows: sets;
        # tombstones: deletes, value NULL) above %(after)s, oldest first, at
        # most %(limit)s: those above %(read)s, and those that the transactions
        # %(pending)s (in progress at an earlier snapshot) wrote above their
        # bounds %(bounds)s, except those of this node's own transactions
        # %(own)s (it applied them itself). A pending transaction still in
        # progress is not looked for (its rows are not visible yet), so one
        # that stays open costs nothing. Always at least one row (the snapshot's).
        new = (
            "(SELECT {row} FROM {table}"
            " WHERE revision > greatest(%(after)s::bigint, %(read)s::bigint)"
            " AND coalesce(xid <> ALL(%(own)s::xid8[]), true)"
            " ORDER BY revision LIMIT %(limit)s)"
        )
        finished = (
            "(SELECT w.* FROM unnest(%(pending)s::xid8[], %(bounds)s::bigint[]) AS p(x, bound)"
            " CROSS JOIN LATERAL (SELECT {row} FROM {table}"
            " WHERE revision > greatest(%(after)s::bigint, p.bound)"
            " AND revision <= %(read)s::bigint"
            " AND xid = p.x ORDER BY revision LIMIT %(limit)s) w"
            " WHERE pg_xact_status(p.x) IS DISTINCT FROM 'in progress'"
            " AND NOT p.x = ANY(%(own)s::xid8[]))"
        )
        parts = " UNION ALL ".join(
            part.format(row=row, table=table)
            for part in (new, finished)
            for row, table in ((row_named, self.table), (tombstone_row, self.tombstones))
        )
        catch_up = (
            "SELECT s.xip, s.top, s.pruned_through, c.key, c.value, c.micros, c.revision"
            " FROM (SELECT ARRAY(SELECT pg_snapshot_xip(pg_current_snapshot())::text) AS xip,"
            f" greatest((SELECT max(revision) FROM {self.table}),"
            f" (SELECT max(revision) FROM {self.tombstones}),"
            f" (SELECT pruned_through FROM {self.meta}), 0) AS top,"
            f" coalesce((SELECT pruned_through FROM {self.meta}), 0) AS pruned_through) s"
            f" LEFT JOIN LATERAL ({parts} ORDER BY revision LIMIT %(limit)s) c ON true"
            " ORDER BY c.revision"
        )
        self.catch_up = (
            "EXECUTE dache_catch_up(%(after)s, %(read)s, %(pending)s::xid8[], %(bounds)s::bigint[],"
            " %(own)s::xid8[], %(limit)s)"
        )
        # The statements every write and catch-up runs, prepared once per
        # connection (their planning would cost more than their execution).
        self.prepare = [
            f"PREPARE dache_lock_keys AS {numbered(lock_keys, ['%s'])}",
            f"PREPARE dache_write AS {numbered(write_locked, ['%s'] * 5)}",
            "PREPARE dache_catch_up AS "
            + numbered(catch_up, [f"%({n})s" for n in CATCH_UP_PARAMETERS]),
        ]
        # Every change in (since, through], oldest first, at most `limit` (a
        # watcher's replay, `through` being the follower's watermark), and, in
        # the same snapshot, pruned_through (always one row).
        self.changes_since = (
            "SELECT m.pruned_through, c.key, c.value, c.micros, c.revision FROM"
            f" (SELECT coalesce((SELECT pruned_through FROM {self.meta}), 0)"
            " AS pruned_through) m LEFT JOIN LATERAL ("
            f" (SELECT {row_named} FROM {self.table}"
            " WHERE revision > %(since)s AND revision <= %(through)s"
            " ORDER BY revision LIMIT %(limit)s)"
            " UNION ALL"
            " (SELECT key, NULL, NULL, revision"
            f" FROM {self.tombstones} WHERE revision > %(since)s AND revision <= %(through)s"
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


CATCH_UP_PARAMETERS = ("after", "read", "pending", "bounds", "own", "limit")


def numbered(query: str, parameters: list[str]) -> str:
    """A psycopg2 query's placeholders (in order; named ones may repeat) as $1, $2, ..."""
    pieces = re.split(r"(%s|%\(\w+\)s)", query)
    positional = iter(range(1, len(parameters) + 1))
    out = []
    for i, piece in enumerate(pieces):
        if i % 2 == 0:
            out.append(piece)
        elif piece == "%s":
            out.append(f"${next(positional)}")
        else:
            out.append(f"${parameters.index(piece) + 1}")
    return "".join(out)


def channel_name(table: str) -> str:
    """The NOTIFY channel of a table (an identifier: at most 63 bytes)."""
    channel = f"dache:{table}"
    if len(channel) > 63:
        channel = "dache:" + hashlib.sha1(table.encode("utf-8")).hexdigest()[:32]
    return channel


def describe_shape(columns: dict[str, str]) -> str:
    return ", ".join(f"{name} {kind}" for name, kind in columns.items())
