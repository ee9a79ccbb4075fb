"""
`make torture`: the history checker with every nemesis, for a while.

    .venv/bin/python -m tests.faults.torture [--minutes 10] [--seed N] [--out DIR]

Runs rounds until the time is up, alternating three postgres-engine nodes on
one table (every nemesis) and one disk-engine node (kill -9 and SIGSTOP), on
a throwaway PostgreSQL cluster of its own; prints each round's table and a
total, and exits 1 if any round found an anomaly (its history is in DIR).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from tests.faults import nemesis
from tests.faults.cluster import Cluster
from tests.faults.runner import run, table
from tests.postgres import PostgresServer

ROUND_SECONDS = 120.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=float(os.environ.get("MINUTES", 10)))
    parser.add_argument("--seed", type=int, default=int(os.environ.get("SEED", time.time())))
    parser.add_argument("--out", default=os.environ.get("OUT", "torture-out"))
    options = parser.parse_args(argv)
    deadline = time.monotonic() + options.minutes * 60
    server = PostgresServer.initdb()
    totals = {"rounds": 0, "ops": 0, "faults": 0, "anomalies": 0}
    print(f"torture: {options.minutes} min, seed {options.seed}, output in {options.out}")
    try:
        round_number = 0
        while time.monotonic() < deadline - 20:
            round_number += 1
            seconds = min(ROUND_SECONDS, deadline - time.monotonic() - 15)
            out = os.path.join(options.out, f"round-{round_number}")
            seed = options.seed + round_number
            if round_number % 3 == 0:
                cluster = Cluster.disk()
                kind = "disk, 1 node"
            else:
                database = server.create_database()
                cluster = Cluster.postgres(server, database)
                kind = "postgres, 3 nodes"
            try:
                cluster.start()
                result = run(cluster, nemesis.available(cluster), seconds, seed, out)
            finally:
                cluster.stop()
            print(f"\n## round {round_number} ({kind}, seed {seed})\n\n{table(result)}", flush=True)
            totals["rounds"] += 1
            totals["ops"] += sum(result.report.counts.values())
            totals["faults"] += len(result.faults)
            totals["anomalies"] += len(result.report.anomalies)
    finally:
        server.destroy()
    print("\n## total\n")
    print(" | ".join(f"{k}: {v}" for k, v in totals.items()))
    return 1 if totals["anomalies"] else 0


if __name__ == "__main__":
    sys.exit(main())
