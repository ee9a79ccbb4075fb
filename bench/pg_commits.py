"""
Commits of several writers on one table, PostgreSQL alone (no dache, no HTTP):

    .venv/bin/python -m bench.pg_commits            # 3 rounds of 3 s per point
    .venv/bin/python -m bench.pg_commits --quick    # 1 round of 2 s

1, 2 and 3 client connections (threads, psycopg2) each write batches of 32
random keys (100k key space) in a loop, as the engine does: the row locks
then the write, both prepared (pg_schema's `write`). The same batches under
one table-wide lock (the table's advisory lock taken exclusively first, as
every write did before the row locks) show what that serialisation cost:
with it, one commit's flush waits for another's. Transactions per second,
medians; a throwaway cluster with fsync on.
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
import time

from dache.engines.pg_schema import TableSQL
from tests.postgres import PostgresServer

BATCH = 32
KEYS = 100_000
CLIENTS = (1, 2, 3)
VALUE = '{"n": 1, "s": "some value"}'


def params(rng: random.Random) -> tuple:
    keys = sorted({f"k{rng.randrange(KEYS)}" for _ in range(BATCH)})
    return keys, keys, [VALUE] * len(keys), [None] * len(keys), [True] * len(keys), []


def rate(server: PostgresServer, table_lock: bool, clients: int, seconds: float) -> float:
    database = server.create_database()
    sql = TableSQL("dache")
    setup = database.connect()
    with setup.cursor() as cursor:
        for statement in sql.create + sql.create_followed:
            cursor.execute(statement)
    setup.close()
    query = f"{sql.lock}; {sql.write}" if table_lock else sql.write
    counts = [0] * clients
    stop = time.monotonic() + seconds

    def client(index: int) -> None:
        connection = database.connect()
        rng = random.Random(index)
        with connection.cursor() as cursor:
            for statement in sql.prepare:
                cursor.execute(statement)
            while time.monotonic() < stop:
                cursor.execute(query, params(rng))
                counts[index] += 1
        connection.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began
    server.drop_database(database)
    return sum(counts) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s per point")
    args = parser.parse_args()
    rounds, seconds = (1, 2.0) if args.quick else (3, 3.0)
    server = PostgresServer.initdb(fsync=True)
    runs: dict[tuple[bool, int], list[float]] = {}
    try:
        for _ in range(rounds):
            for table_lock in (True, False):
                for clients in CLIENTS:
                    runs.setdefault((table_lock, clients), []).append(
                        rate(server, table_lock, clients, seconds)
                    )
    finally:
        server.destroy()
    print(f"| writers | clients | {BATCH}-key transactions/s (median of {rounds}) | ratio |")
    print("|---|---|---|---|")
    for table_lock in (True, False):
        base = statistics.median(runs[(table_lock, 1)])
        for clients in CLIENTS:
            median = statistics.median(runs[(table_lock, clients)])
            name = "one table-wide lock" if table_lock else "row locks per key"
            print(f"| {name} | {clients} | {median:,.0f} | {median / base:.2f} |")


if __name__ == "__main__":
    main()
