"""
The PostgreSQL engine's benchmark, runnable on its own:

    .venv/bin/python -m bench.postgres_engine            # full: 1M rows, 3 x 5 s per point
    .venv/bin/python -m bench.postgres_engine --quick    # 100k rows, 1 x 2 s per point

1. Start-up load: a table of N rows (~100-byte JSON values) is loaded by a
   `twistd dache` node; the time is the node's own "loaded N entries in Xs".
2. SET throughput at 1, 16 and 64 concurrent clients (wrk, keep-alive POSTs
   to random keys), memory engine vs postgres engine side by side, and
   PostgreSQL transactions per request (group commit at work).

It starts a throwaway PostgreSQL cluster with fsync on (a commit costs a real
WAL flush, as in production). dache, wrk and PostgreSQL share this machine;
with `taskset` available dache is pinned to CPU 0 and wrk to the last CPU.
Medians of the repeats are reported.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from dache.engines.pg_schema import TableSQL
from tests.postgres import PostgresServer
from tests.process import DacheProcess

LOADED = re.compile(r"loaded (\d+) entries in ([\d.]+)s")
COMMITTED = re.compile(r"(\d+) write transactions committed")
REQUESTS = re.compile(r"(\d+) requests in")
REQUESTS_PER_SECOND = re.compile(r"Requests/sec:\s+([\d.]+)")
PERCENTILE = re.compile(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.M)
WRK_SCRIPT = """
counter = 0
request = function()
    counter = counter + 1
    local key = math.random(1, 100000)
    local body = '{"value":{"n":' .. counter .. ',"s":"benchmark value of some length"}}'
    return wrk.format("POST", "/dache/bench" .. key, {["Content-Type"]="application/json"}, body)
end
"""


def pinned(cpu: int, command: list[str]) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        return ["taskset", "-c", str(cpu), *command]
    return command


def start_node(env: dict[str, str]) -> DacheProcess:
    """A `twistd dache` node, pinned to CPU 0 when taskset is there."""
    node = DacheProcess(env).start(timeout=600)
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        subprocess.run(["taskset", "-a", "-p", "-c", "0", str(node.proc.pid)], capture_output=True)
    return node


def fill(database, rows: int) -> None:
    sql = TableSQL("dache")  # the table as dache creates it
    database.sql(";".join(sql.create + sql.create_followed))
    database.sql(
        "INSERT INTO dache (key, value, expiry)"
        " SELECT 'key:' || i,"
        ' \'{"n":\' || i || \',"s":"\' || md5(i::text) || \'","tags":["a","b"]}\','
        " CASE WHEN i %% 10 = 0 THEN now() + interval '1 day' END"
        " FROM generate_series(1, %s) AS i",
        (rows,),
    )
    database.sql("VACUUM ANALYZE dache")


def measure_load(server: PostgresServer, rows: int, repeats: int) -> list[tuple[int, float, int]]:
    database = server.create_database()
    began = time.monotonic()
    fill(database, rows)
    print(f"  filled {rows} rows in {time.monotonic() - began:.1f}s", file=sys.stderr)
    results = []
    for _ in range(repeats):
        node = start_node(database.env)
        match = LOADED.search(node.output())
        rss = _rss_kib(node.proc.pid)
        node.terminate()
        assert match, node.output()
        results.append((int(match.group(1)), float(match.group(2)), rss))
    return results


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def wrk(port: int, clients: int, seconds: float, script: str) -> tuple[float, float, float, int]:
    """(requests/s, p50 ms, p99 ms, requests)."""
    command = [
        "wrk",
        f"-c{clients}",
        "-t1",
        f"-d{seconds}s",
        "--latency",
        "-s",
        script,
        f"http://127.0.0.1:{port}/",
    ]
    out = subprocess.run(
        pinned((os.cpu_count() or 1) - 1, command), capture_output=True, text=True, check=True
    ).stdout
    if "Non-2xx" in out:
        raise RuntimeError("wrk saw non-2xx answers:\n" + out)
    rate = float(REQUESTS_PER_SECOND.search(out).group(1))
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    percentiles = {p: float(v) * scale[u] for p, v, u in PERCENTILE.findall(out)}
    return rate, percentiles["50"], percentiles["99"], int(REQUESTS.search(out).group(1))


def committed_transactions(node: DacheProcess) -> int:
    """Write transactions, from the line the engine logs when it closes."""
    match = COMMITTED.search(node.output())
    assert match, node.output()
    return int(match.group(1))


def measure_sets(server, concurrencies, seconds, repeats, script):
    """Memory and postgres runs alternate, so a busy neighbour slows both alike."""
    rows = []
    for clients in concurrencies:
        runs = {"memory": [], "postgres": []}
        transactions = requests = 0
        for _ in range(repeats):
            for engine in runs:
                if engine == "postgres":
                    database = server.create_database()
                    env = database.env
                else:
                    env = {"DURABILITY_ENGINE": "memory"}
                node = start_node({**env, "WRITE_TIMEOUT": "10"})
                rate, p50, p99, count = wrk(node.port, clients, seconds, script)
                node.terminate()
                if engine == "postgres":
                    transactions += committed_transactions(node)
                    requests += count
                runs[engine].append((rate, p50, p99))
                print(f"  {engine:8} c={clients:<3} {rate:8.0f} req/s", file=sys.stderr)
        result = {
            engine: tuple(statistics.median(r[i] for r in results) for i in range(3))
            for engine, results in runs.items()
        }
        rows.append((clients, result, transactions / requests))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100k rows, 1 x 2 s per point")
    parser.add_argument("--rows", type=int, help="rows for the load benchmark")
    args = parser.parse_args()
    rows = args.rows or (100_000 if args.quick else 1_000_000)
    seconds, repeats = (2, 1) if args.quick else (5, 3)
    if not shutil.which("wrk"):
        sys.exit("wrk is needed for the throughput benchmark (apt-get install wrk)")

    server = PostgresServer.initdb(fsync=True)
    try:
        with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
            script.write(WRK_SCRIPT)
        print("load ...", file=sys.stderr)
        loads = measure_load(server, rows, 1 if args.quick else 3)
        print("sets ...", file=sys.stderr)
        sets = measure_sets(server, (1, 16, 64), seconds, repeats, script.name)
    finally:
        server.destroy()
        os.unlink(script.name)

    count = loads[0][0]
    load_seconds = statistics.median(seconds for _, seconds, _ in loads)
    print(f"\n### Start-up load ({count} live rows of {rows}, median of {len(loads)})\n")
    print("| rows loaded | seconds | rows/s | node RSS after load |")
    print("|---|---|---|---|")
    print(
        f"| {count} | {load_seconds:.2f} | {count / load_seconds:,.0f} "
        f"| {statistics.median(r for _, _, r in loads) / 1024:.0f} MiB |"
    )
    print(f"\n### SET throughput (wrk, {seconds} s per run, median of {repeats})\n")
    print(
        "| clients | memory req/s | postgres req/s | postgres / memory "
        "| memory p50 / p99 ms | postgres p50 / p99 ms | PG transactions per request |"
    )
    print("|---|---|---|---|---|---|---|")
    for clients, result, per_request in sets:
        memory, pg = result["memory"], result["postgres"]
        print(
            f"| {clients} | {memory[0]:,.0f} | {pg[0]:,.0f} | {pg[0] / memory[0]:.2f} "
            f"| {memory[1]:.2f} / {memory[2]:.2f} | {pg[1]:.2f} / {pg[2]:.2f} "
            f"| {per_request:.3f} |"
        )


if __name__ == "__main__":
    main()
