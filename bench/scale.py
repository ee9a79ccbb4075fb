"""
Scaling out (`make bench` runs it; it writes bench/RESULTS-scale.md):

    .venv/bin/python -m bench.scale            # 2000 writes per point, 5 x 5 s wrk runs
    .venv/bin/python -m bench.scale --quick    # 300 writes, 1 x 2 s

1. Convergence delay: three `twistd dache` nodes on one PostgreSQL table. One
   writes a key (a keep-alive client, one write at a time); the other two are
   polled until they serve the write's revision. The delay is from the 204 to
   the first GET that shows it, per follower, so it includes one GET's round
   trip (the poll's resolution). Idle, and while a third client loads the
   writing node with SETs (wrk, 16 connections).
2. Throughput of WORKERS=2 (and, for SETs, 3) against WORKERS=1 on one port:
   every worker is a node on the table. wrk GETs (10,000 keys) and SETs
   (random keys), runs alternating, medians; with the CPU each
   party used (dache processes, PostgreSQL, wrk) from /proc, since the load
   generator shares the machine's cores.

It starts a throwaway PostgreSQL cluster with fsync on, as bench.postgres_engine.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from bench.postgres_engine import REQUESTS_PER_SECOND, WRK_SCRIPT
from tests.postgres import PostgresServer
from tests.process import DacheProcess

GET_SCRIPT = """
request = function()
    return wrk.format("GET", "/dache/bench" .. math.random(1, 10000))
end
"""
TICKS = os.sysconf("SC_CLK_TCK")
HERE = os.path.dirname(os.path.abspath(__file__))
WORKERS = {"GET": (1, 2), "SET": (1, 2, 3)}
# Issue 25: SETs with 2 workers >= 1.4x one worker, with 3 >= 1.6x.
SET_GOALS = {2: 1.4, 3: 1.6}


class Client:
    """One keep-alive HTTP connection to a node."""

    def __init__(self, port: int):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, str, bytes]:
        self.connection.request(method, path, body=body)
        response = self.connection.getresponse()
        return response.status, response.getheader("etag") or "", response.read()


def convergence(nodes: list[DacheProcess], writes: int) -> list[float]:
    """Seconds from each write's 204 on nodes[0] to each other node serving it."""
    writer = Client(nodes[0].port)
    followers = [Client(node.port) for node in nodes[1:]]
    delays = []
    for i in range(writes):
        path = f"/dache/probe{i % 50}"
        status, etag, _ = writer.request("POST", path, json.dumps({"value": i}).encode())
        acknowledged = time.perf_counter()
        assert status == 204, status
        pending = set(range(len(followers)))
        deadline = acknowledged + 5
        while pending:
            for index in list(pending):
                _, served, _ = followers[index].request("GET", path)
                if served and int(served.strip('"')) >= int(etag.strip('"')):
                    delays.append(time.perf_counter() - acknowledged)
                    pending.discard(index)
            if time.perf_counter() > deadline:
                raise RuntimeError(f"write {i} not served by every node within 5 s")
    return delays


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        except FileNotFoundError:
            pass
    return total / TICKS


def children(pid: int) -> list[int]:
    found = []
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as listing:
            found = [int(child) for child in listing.read().split()]
    except FileNotFoundError:
        pass
    return [grandchild for child in found for grandchild in [child, *children(child)]]


def machine_busy() -> tuple[float, float]:
    """(busy seconds, total seconds) of every CPU, from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields) - idle) / TICKS, sum(fields) / TICKS


def wrk(port: int, clients: int, seconds: float, script: str) -> tuple[float, float]:
    """(requests/s, wrk's CPU seconds)."""
    command = ["wrk", f"-c{clients}", "-t1", f"-d{seconds}s", "-s", script]
    before = os.times()
    out = subprocess.run(
        [*command, f"http://127.0.0.1:{port}/"], capture_output=True, text=True, check=True
    ).stdout
    after = os.times()
    if "Non-2xx" in out:
        raise RuntimeError("wrk saw non-2xx answers:\n" + out)
    used = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    return float(REQUESTS_PER_SECOND.search(out).group(1)), used


def throughput(server, workers, kind, script, seconds):
    """One run: (req/s, CPU seconds of dache, PostgreSQL, wrk, the whole machine)."""
    database = server.create_database()
    node = DacheProcess({**database.env, "WORKERS": str(workers), "WRITE_TIMEOUT": "10"})
    node.start(timeout=120)
    deadline = time.monotonic() + 30
    while node.output().count("listening on") < workers:
        assert time.monotonic() < deadline, node.output()
        time.sleep(0.05)
    if kind == "GET":
        client = Client(node.port)
        for i in range(1, 10_001):
            client.request("POST", f"/dache/bench{i}", b'{"value": {"n": 1, "s": "some value"}}')
    postmaster = int(open(os.path.join(server.data, "postmaster.pid")).readline())
    dache_pids = [node.proc.pid, *children(node.proc.pid)]
    pg_pids = [postmaster, *children(postmaster)]
    dache_before, pg_before = cpu_seconds(dache_pids), cpu_seconds(pg_pids)
    busy_before, total_before = machine_busy()
    rate, wrk_cpu = wrk(node.port, 64, seconds, script)
    busy, total = machine_busy()
    dache_cpu = cpu_seconds(dache_pids) - dache_before
    pg_cpu = cpu_seconds(pg_pids) - pg_before
    node.terminate()
    server.drop_database(database)
    return rate, dache_cpu, pg_cpu, wrk_cpu, busy - busy_before, total - total_before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="300 writes, 1 x 2 s per point")
    parser.add_argument("--repeats", type=int, help="runs per throughput point")
    parser.add_argument("--sets", action="store_true", help="only the SET throughput")
    args = parser.parse_args()
    writes, seconds, repeats = (300, 2, 1) if args.quick else (2000, 5, 5)
    repeats = args.repeats or repeats
    if not shutil.which("wrk"):
        sys.exit("wrk is needed (apt-get install wrk)")
    load_average = os.getloadavg()

    server = PostgresServer.initdb(fsync=True)
    scripts = {}
    try:
        for kind, text in (("GET", GET_SCRIPT), ("SET", WRK_SCRIPT)):
            with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
                script.write(text)
            scripts[kind] = script.name

        idle = loaded = None
        if not args.sets:
            database = server.create_database()
            nodes = [DacheProcess(database.env).start(timeout=60) for _ in range(3)]
            print("convergence, idle ...", file=sys.stderr)
            idle = convergence(nodes, writes)
            print("convergence, under load ...", file=sys.stderr)
            url = f"http://127.0.0.1:{nodes[0].port}/"
            command = ["wrk", "-c16", "-t1", "-d3600s", "-s", scripts["SET"], url]
            load = subprocess.Popen(command, stdout=subprocess.DEVNULL)
            time.sleep(1)
            try:
                loaded = convergence(nodes, writes)
            finally:
                load.terminate()
                load.wait()
            for node in nodes:
                node.terminate()

        runs = {}
        for kind in ("SET",) if args.sets else ("GET", "SET"):
            for _ in range(repeats):
                for workers in WORKERS[kind]:
                    result = throughput(server, workers, kind, scripts[kind], seconds)
                    runs.setdefault((kind, workers), []).append(result)
                    print(f"  {kind} WORKERS={workers}: {result[0]:,.0f} req/s", file=sys.stderr)
    finally:
        server.destroy()
        for name in scripts.values():
            os.unlink(name)

    lines = [
        "# Scaling out: benchmark results",
        "",
        f"Written by `python -m bench.scale{' --quick' if args.quick else ''}` (part of "
        "`make bench`): a throwaway PostgreSQL cluster with `fsync=on` on this machine, "
        "`twistd dache` nodes on one table. See the module's docstring for the method.",
        "",
        f"Load average before the run: {' '.join(f'{v:.2f}' for v in load_average)}; "
        f"{os.cpu_count()} cores, shared by dache, PostgreSQL and wrk.",
    ]
    if idle is not None and loaded is not None:
        lines += [
            "",
            f"## Convergence delay ({writes} writes, each to one node, seen by two others)",
            "",
            "| condition | p50 ms | p90 ms | p99 ms | max ms |",
            "|---|---|---|---|---|",
        ]
        for name, delays in (("idle", idle), ("writer node under wrk SET load, c=16", loaded)):
            ms = [d * 1000 for d in delays]
            lines.append(
                f"| {name} | {percentile(ms, 50):.2f} | {percentile(ms, 90):.2f} "
                f"| {percentile(ms, 99):.2f} | {max(ms):.2f} |"
            )
    lines += [
        "",
        f"## WORKERS=N against WORKERS=1 (wrk -c64, {seconds} s, median of {repeats})",
        "",
        "| load | WORKERS | req/s (median) | ratio | goal | runs | dache CPU | PostgreSQL CPU "
        "| wrk CPU | other processes' CPU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in ("GET", "SET"):
        if (kind, 1) not in runs:
            continue
        base = statistics.median(r[0] for r in runs[(kind, 1)])
        for workers in WORKERS[kind]:
            results = runs[(kind, workers)]
            rate = statistics.median(r[0] for r in results)
            share = [statistics.median(r[i] / seconds for r in results) for i in range(1, 4)]
            others = statistics.median(
                r[4] / r[5] * (os.cpu_count() or 1) - (r[1] + r[2] + r[3]) / seconds
                for r in results
            )
            each = " / ".join(f"{r[0] / 1000:.1f}k" for r in results)
            goal = SET_GOALS.get(workers) if kind == "SET" else None
            verdict = (
                "" if goal is None else f">= {goal}x: {'met' if rate / base >= goal else 'NOT met'}"
            )
            lines.append(
                f"| {kind} | {workers} | {rate:,.0f} | {rate / base:.2f} | {verdict} | {each} "
                f"| {share[0]:.2f} | {share[1]:.2f} | {share[2]:.2f} | {max(others, 0):.2f} |"
            )
    lines += [
        "",
        f"(CPU columns: cores busy on average over a run, of the machine's {os.cpu_count()}; "
        "other processes' CPU is work that is not this benchmark's, e.g. other jobs.)",
        "",
        "Every worker is a node: SETs of different keys by different nodes commit in "
        "parallel (row locks per key, no table-wide lock), so PostgreSQL flushes their "
        "commits together. On a machine whose cores the load generator and PostgreSQL "
        "share with dache, the ratio is bounded by the CPU the workers can get.",
        "",
    ]
    text = "\n".join(lines)
    with open(os.path.join(HERE, "RESULTS-scale.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
