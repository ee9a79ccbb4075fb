"""
Watch benchmark: event delivery latency and the write cost of watchers,
written to bench/RESULTS-watch.md (part of `make bench`).

    .venv/bin/python -m bench.watch [--quick]

Latency: two dache nodes on one PostgreSQL table (A and B), N watchers per
node of the written prefix (N-1 drained, one measured): each write's 204 on
A to its event at the measured watcher on A (same node) and on B (across
nodes). Throughput: a memory-engine node, wrk SET (c=16) against it with no
watchers, then with N watchers of the written prefix and 10,000 idle ones of
another prefix; SET/s as a ratio of none, and the node's CPU per delivered
event per watcher: (node CPU - requests x its CPU per request with no
watchers) / events sent (dache_watch_events_sent_total). The nodes run on
core 0, wrk, the writer and the watchers on core 1. The drained watchers of a
node are one process of raw sockets (a selector loop that reads each socket a
few dozen times a second, so the clients stay cheap), however many they are. The file limit
they need is raised here, for this process and the nodes it starts.

    python -m bench.watch --only-throughput --watchers 1000 [--repeats 3]
        (no latency part, and the table printed, not written: for profiling)
    python -m bench.watch --drain COUNT PREFIX PORT   (the watchers' process)
"""

from __future__ import annotations

import argparse
import os
import resource
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from bench.postgres_engine import WRK_SCRIPT, pinned, start_node
from bench.scale import Client, cpu_seconds, percentile
from tests.postgres import PostgresServer

HERE = os.path.dirname(os.path.abspath(__file__))
NODE_CPU, CLIENT_CPU = 0, 1
WRITTEN = "bench"  # wrk's keys are bench<n>
OTHER = "other/"
LIMITS = {"MAX_CONNECTIONS": "1000", "WATCH_MAX": "25000"}


def watch_request(prefix: str) -> bytes:
    return f"GET /dache?watch=true&prefix={prefix} HTTP/1.1\r\nHost: dache\r\n\r\n".encode()


def raise_file_limit(needed: int) -> None:
    """Enough file descriptors for every socket; the nodes started later inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))  # as root
            return
        except (ValueError, OSError):
            sys.exit(f"the file limit is {hard} (hard); {needed} are needed")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


# -- the drained watchers: one process of raw sockets, read in bulk

DRAIN_EVERY = 0.05  # seconds between reads: each recv takes many events at once


def _drain(count: int, prefix: str, port: int) -> None:
    request = watch_request(prefix)
    sockets = []
    for _ in range(count):  # one at a time: the listen backlog never overflows
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.sendall(request)
        head = s.recv(4096)
        if not head.startswith(b"HTTP/1.1 200"):
            sys.exit(f"a watch was refused: {head[:200]!r}")
        s.setblocking(False)
        sockets.append(s)
    selector = selectors.DefaultSelector()
    for s in sockets:
        selector.register(s, selectors.EVENT_READ)
    selector.register(sys.stdin, selectors.EVENT_READ)  # closed by the bench: the end
    print("ready", flush=True)
    buffer = bytearray(1 << 20)
    while True:
        for key, _ in selector.select():
            if key.fileobj is sys.stdin:
                return
            try:
                key.fileobj.recv_into(buffer)
            except BlockingIOError:
                pass
        time.sleep(DRAIN_EVERY)  # a few dozen reads a second per socket, not one an event


class Drained:
    """`count` watchers of `prefix` on each port, read and discarded: one process a port."""

    def __init__(self, count: int, prefix: str, ports: list[int]):
        self.procs = []
        if count <= 0:
            return
        command = [sys.executable, "-m", "bench.watch", "--drain", str(count), prefix]
        for port in ports:
            self.procs.append(
                subprocess.Popen(
                    pinned(CLIENT_CPU, [*command, str(port)]),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        for proc in self.procs:
            line = proc.stdout.readline()
            if line.strip() != "ready":
                self.close()
                raise RuntimeError(f"the watchers did not open ({line.strip()!r})")

    def close(self) -> None:
        for proc in self.procs:
            proc.stdin.close()
        for proc in self.procs:
            proc.wait(timeout=60)
        self.procs = []


# -- latency


class Timed:
    """A watcher that notes when each key's event arrived."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.sendall(watch_request(WRITTEN))
        self.arrived: dict[str, float] = {}
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        buffer = b""
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            now = time.perf_counter()
            buffer += data
            while b'"key":"' in buffer:
                start = buffer.index(b'"key":"') + 7
                end = buffer.find(b'"', start)
                if end < 0:
                    break
                self.arrived[buffer[start:end].decode()] = now
                buffer = buffer[end:]

    def close(self) -> None:
        self.sock.close()


def latency(a: Any, b: Any, watchers: int, writes: int, run: int):
    drained = Drained(watchers - 1, WRITTEN, [a.port, b.port])
    on_a, on_b = Timed(a.port), Timed(b.port)
    try:
        time.sleep(0.5)
        writer, acked = Client(a.port), {}
        for i in range(writes):
            key = f"{WRITTEN}{run}-{watchers}-{i}"
            status, _, _ = writer.request("PUT", f"/dache/{key}", b'{"value": "a bench value"}')
            assert status == 204, status
            acked[key] = time.perf_counter()
            time.sleep(0.002)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (
            len(on_a.arrived) < writes or len(on_b.arrived) < writes
        ):
            time.sleep(0.05)
    finally:
        on_a.close()
        on_b.close()
        drained.close()
    same = [(on_a.arrived[k] - t) * 1000 for k, t in acked.items() if k in on_a.arrived]
    across = [(on_b.arrived[k] - t) * 1000 for k, t in acked.items() if k in on_b.arrived]
    return same, across


# -- throughput and CPU per event


def wrk_requests(port: int, seconds: int, script: str) -> int:
    command = pinned(
        CLIENT_CPU,
        ["wrk", "-c16", "-t1", f"-d{seconds}s", "-s", script, f"http://127.0.0.1:{port}/"],
    )
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if "requests in" in line)
    return int(line.split()[0])


def events_sent(node: Any) -> int:
    status, _, body = Client(node.port).request("GET", "/metrics")
    assert status == 200
    line = next(x for x in body.decode().splitlines() if x.startswith("dache_watch_events_sent"))
    return int(float(line.split()[1]))


def throughput(node: Any, count: int, prefix: str, seconds: int, script: str) -> dict:
    drained = Drained(count, prefix, [node.port])
    try:
        cpu, sent = cpu_seconds([node.proc.pid]), events_sent(node)
        began = time.perf_counter()
        requests = wrk_requests(node.port, seconds, script)
        elapsed = time.perf_counter() - began
        cpu, sent = cpu_seconds([node.proc.pid]) - cpu, events_sent(node) - sent
    finally:
        drained.close()
    return {"rate": requests / elapsed, "requests": requests, "cpu": cpu, "sent": sent}


def measure_latency(counts: tuple[int, ...], writes: int) -> list[tuple[int, list, list]]:
    rows = []
    server = PostgresServer.initdb(fsync=True)
    try:
        database = server.create_database()
        a, b = (start_node({**database.env, **LIMITS}) for _ in range(2))
        for watchers in counts:
            same, across = latency(a, b, watchers, writes, len(rows))
            rows.append((watchers, same, across))
            print(f"  latency, {watchers} watchers: done", file=sys.stderr)
        a.terminate()
        b.terminate()
    finally:
        server.destroy()
    return rows


def measure_throughput(loads: list, repeats: int, seconds: int) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT)
    runs: dict[tuple[int, str], list[dict]] = {(0, WRITTEN): [], **{load: [] for load in loads}}
    node = start_node({"DURABILITY_ENGINE": "memory", **LIMITS})
    try:
        for _ in range(repeats):  # alternating: each repeat runs every load once
            for count, prefix in runs:
                runs[count, prefix].append(throughput(node, count, prefix, seconds, script.name))
                print(f"  throughput, {count} of {prefix!r}: done", file=sys.stderr)
    finally:
        node.terminate()
        os.unlink(script.name)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of about a minute")
    parser.add_argument(
        "--only-throughput",
        action="store_true",
        help="only the write throughput, printed and not written to RESULTS-watch.md",
    )
    parser.add_argument(
        "--only-latency",
        action="store_true",
        help="only the delivery latency, printed and not written to RESULTS-watch.md",
    )
    parser.add_argument(
        "--watchers",
        type=int,
        action="append",
        help="with --only-*: watchers per node of the written prefix (repeatable)",
    )
    parser.add_argument("--repeats", type=int, help="with --only-throughput (default 3)")
    parser.add_argument("--drain", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.drain:
        count, prefix, port = args.drain
        _drain(int(count), prefix, int(port))
        return 0
    if not shutil.which("wrk"):
        sys.exit("wrk is needed (apt-get install wrk)")
    if args.quick:
        writes, seconds, repeats, counts = 200, 3, 1, (1, 100, 1000)
        loads = [(1000, WRITTEN), (10_000, OTHER)]
    else:
        writes, seconds, repeats, counts = 1000, 5, 3, (1, 100, 1000, 10_000)
        loads = [(100, WRITTEN), (1000, WRITTEN), (10_000, WRITTEN), (10_000, OTHER)]
    if args.only_throughput:
        counts, repeats = (), args.repeats or 3
        loads = [(count, WRITTEN) for count in args.watchers or (1000,)]
    if args.only_latency:
        counts, loads = tuple(args.watchers or (1000,)), []
    # Every process holds at most one node's watchers (a node, a drain process).
    raise_file_limit(max(counts + tuple(c for c, _ in loads)) + 1000)
    os.sched_setaffinity(0, {CLIENT_CPU % (os.cpu_count() or 1)})  # the nodes move to core 0
    load_average = os.getloadavg()
    began = time.monotonic()

    rows = [] if args.only_throughput else measure_latency(counts, writes)

    runs = {} if args.only_latency else measure_throughput(loads, repeats, seconds)

    latency_head = (
        f"### Event delivery latency, ms: a write's 204 on A -> its event ({writes} writes)"
    )
    lines = [
        "# Watch benchmark",
        "",
        f"`python -m bench.watch{' --quick' if args.quick else ''}` "
        f"({time.monotonic() - began:.0f} s; load average before the run: "
        f"{' '.join(f'{v:.2f}' for v in load_average)}). Nodes on core {NODE_CPU}; wrk, the "
        f"writer and the watchers (one process per node) on core {CLIENT_CPU}.",
        "",
        latency_head,
        "",
        "Two nodes on one PostgreSQL table (fsync on); per node one measured watcher and N-1 "
        "drained ones, all of the written prefix. Same node below zero: the event arrived "
        "before the writer had read its 204.",
        "",
        "| watchers per node | path | p50 | p99 | max | received |",
        "|---|---|---|---|---|---|",
    ]
    for watchers, same, across in rows:
        for name, values in (("same node (A -> A)", same), ("across nodes (A -> B)", across)):
            if not values:
                lines.append(f"| {watchers:,} | {name} | - | - | - | 0/{writes} |")
                continue
            lines.append(
                f"| {watchers:,} | {name} | {percentile(values, 50):.2f} "
                f"| {percentile(values, 99):.2f} | {max(values):.2f} | {len(values)}/{writes} |"
            )
    if args.only_latency:
        print("\n".join(lines[lines.index(latency_head) :]))
        return 0
    median = statistics.median
    none = runs[0, WRITTEN]
    base_rate = median(r["rate"] for r in none)
    cpu_per_request = median(r["cpu"] / r["requests"] for r in none)
    throughput_head = (
        f"### Write throughput: memory engine, wrk -c16 SET, {seconds} s, median of {repeats}"
    )
    lines += [
        "",
        throughput_head,
        "",
        "Ratio by CPU: the node's CPU per SET with no watchers / with these (what the SET/s "
        "ratio is when the node's core is the limit, and steadier on a shared machine). CPU "
        "per event per watcher: the node's CPU beyond its CPU per SET with no watchers, "
        "divided by the events it sent (one per event per watcher).",
        "",
        "| watchers | SET/s | ratio to none | node CPU per SET | ratio by CPU | events sent "
        "| CPU per event per watcher |",
        "|---|---|---|---|---|---|---|",
    ]
    for (count, prefix), results in runs.items():
        rate = median(r["rate"] for r in results)
        sent = median(r["sent"] for r in results)
        per_event = [
            (r["cpu"] - r["requests"] * cpu_per_request) / r["sent"] for r in results if r["sent"]
        ]
        cost = f"{median(per_event) * 1e6:.2f} us" if per_event else "-"
        which = "the written" if prefix == WRITTEN else "another"
        name = f"{count:,} of {which} prefix" if count else "none"
        per_request = median(r["cpu"] / r["requests"] for r in results)
        lines.append(
            f"| {name} | {rate:,.0f} | {rate / base_rate:.2f} | {per_request * 1e6:.0f} us "
            f"| {cpu_per_request / per_request:.2f} | {sent:,.0f} | {cost} |"
        )
    lines.append("")
    text = "\n".join(lines)
    if args.only_throughput:
        print("\n".join(lines[lines.index(throughput_head) :]))
        return 0
    with open(os.path.join(HERE, "RESULTS-watch.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
