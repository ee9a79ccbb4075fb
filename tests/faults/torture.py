"""
`make torture`: the history checker with every nemesis, for a while.

    .venv/bin/python -m tests.faults.torture [--minutes 10] [--seed N] [--out DIR]

Runs rounds until the time is up, alternating three postgres-engine nodes on
one table (every nemesis but power loss), one disk-engine node (kill -9,
power loss and SIGSTOP), on a throwaway PostgreSQL cluster of its own, and
three postgres-engine nodes on a primary and its synchronous standby under
pg_auto_failover (the primary killed and the standby promoted, kill -9 and
SIGSTOP of nodes: tests/faults/failover.py); prints
each round's table and a total, and exits 1 if any round found an anomaly
(its history is in DIR).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from tests.faults import nemesis
from tests.faults.cluster import Cluster
from tests.faults.failover import HAPostgres
from tests.faults.runner import Result, run, summary
from tests.history import Report
from tests.postgres import PostgresServer

ROUND_SECONDS = 120.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument(
        "--out", default=os.path.join(tempfile.gettempdir(), "dache-torture"), help="anomaly files"
    )
    options = parser.parse_args(argv)
    deadline = time.monotonic() + options.minutes * 60
    server = PostgresServer.initdb()
    results = []
    print(f"torture: {options.minutes} min, seed {options.seed}, output in {options.out}")
    try:
        round_number = 0
        while time.monotonic() < deadline - 20:
            round_number += 1
            seconds = min(ROUND_SECONDS, deadline - time.monotonic() - 15)
            out = os.path.join(options.out, f"round-{round_number}")
            seed = options.seed + round_number
            ha = None
            if round_number % 3 == 0:
                cluster = Cluster.disk()
                kind = "disk, 1 node"
            elif round_number % 3 == 2:
                ha = HAPostgres.start_new()
                cluster = Cluster.failover(ha, ha.create_database())
                kind = "postgres failover (pg_auto_failover), 3 nodes"
            else:
                database = server.create_database()
                cluster = Cluster.postgres(server, database)
                kind = "postgres, 3 nodes"
            try:
                cluster.start()
                result = run(cluster, nemesis.available(cluster), seconds, seed, out)
            finally:
                cluster.stop()
                if ha is not None:
                    ha.destroy()
            print(
                f"\n## round {round_number} ({kind}, seed {seed})\n\n{summary(result)}", flush=True
            )
            results.append(result)
    finally:
        server.destroy()
    print(f"\n## total: {len(results)} rounds, seed {options.seed}\n\n{summary(combined(results))}")
    return 1 if any(r.report.anomalies for r in results) else 0


def combined(results: list[Result]) -> Result:
    """One Result summing the rounds' (a node's windows from every round it was in)."""
    counts: dict[str, int] = {}
    windows = {}
    for result in results:
        for name, n in result.report.counts.items():
            counts[name] = counts.get(name, 0) + n
        for node, spans in result.windows.items():
            windows.setdefault(node, []).extend(spans)
    report = Report(
        [a for r in results for a in r.report.anomalies],
        counts,
        [lag for r in results for lag in r.report.lag],
        sum(r.report.keys for r in results),
    )
    return Result(
        report,
        [f for r in results for f in r.faults],
        [e for r in results for e in r.nemesis_errors],
        windows,
        sum(r.seconds for r in results),
        ", ".join(r.anomalies_file for r in results if r.anomalies_file) or None,
        sum(r.precondition_failed for r in results),
    )


if __name__ == "__main__":
    sys.exit(main())
