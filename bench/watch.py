"""
Watch benchmark: event delivery latency and the write cost of watchers.

    .venv/bin/python -m bench.watch [--quick]

Two dache nodes on one PostgreSQL table (A and B). For 1 and 1,000 watchers
per node (all on the same prefix, all drained), one measured watcher on A and
one on B time each write from its 204 on A to its event: same node (A -> A)
and across nodes (A -> B). Then write throughput (wrk SET, c=16, pinned to
another core than the node) on a memory-engine node with 1,000 watchers of the
written prefix against none, side by side, repeated, medians. Load only
against 127.0.0.1, bounded in count and time.
"""

from __future__ import annotations

import argparse
import os
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from bench.postgres_engine import WRK_SCRIPT, pinned
from bench.scale import Client, percentile
from tests.postgres import PostgresServer
from tests.process import DacheProcess

WATCH = b"GET /dache?watch=true&prefix=bench HTTP/1.1\r\nHost: dache\r\n\r\n"


def open_watch(port: int, request: bytes = WATCH) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(request)
    assert s.recv(4096).startswith(b"HTTP/1.1 200")
    s.setblocking(False)
    return s


class Drain:
    """Reads and discards every byte of many watch streams, on one thread."""

    def __init__(self, sockets: list[socket.socket]):
        self.selector = selectors.DefaultSelector()
        for s in sockets:
            self.selector.register(s, selectors.EVENT_READ)
        self.sockets = sockets
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.running:
            for key, _ in self.selector.select(0.2):
                try:
                    key.fileobj.recv(65536)
                except BlockingIOError:
                    pass

    def close(self) -> None:
        self.running = False
        self.thread.join()
        for s in self.sockets:
            s.close()


class Timed:
    """A watcher that notes when each key's event arrived."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.sendall(WATCH)
        self.arrived: dict[str, float] = {}
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        buffer = b""
        while True:
            data = self.sock.recv(65536)
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


def latency(a: DacheProcess, b: DacheProcess, watchers: int, writes: int, run: int):
    idle = [open_watch(node.port) for node in (a, b) for _ in range(watchers - 1)]
    drain = Drain(idle)
    on_a, on_b = Timed(a.port), Timed(b.port)
    time.sleep(0.5)
    writer, acked = Client(a.port), {}
    for i in range(writes):
        key = f"bench{run}-{watchers}-{i}"
        writer.request("PUT", f"/dache/{key}", b'{"value": "some benchmark value"}')
        acked[key] = time.perf_counter()
        time.sleep(0.002)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (
        len(on_a.arrived) < writes or len(on_b.arrived) < writes
    ):
        time.sleep(0.05)
    drain.close()
    same = [(on_a.arrived[k] - t) * 1000 for k, t in acked.items() if k in on_a.arrived]
    across = [(on_b.arrived[k] - t) * 1000 for k, t in acked.items() if k in on_b.arrived]
    return same, across


def wrk_rate(port: int, seconds: int, script: str) -> float:
    command = pinned(
        1, ["wrk", "-c16", "-t1", f"-d{seconds}s", "-s", script, f"http://127.0.0.1:{port}/"]
    )
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("Requests/sec"))
    return float(line.split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 writes, 1 x 3 s per point")
    args = parser.parse_args()
    writes, seconds, repeats = (200, 3, 1) if args.quick else (1000, 5, 3)
    if not shutil.which("wrk"):
        sys.exit("wrk is needed (apt-get install wrk)")
    load_average = os.getloadavg()
    rows = []
    server = PostgresServer.initdb(fsync=True)
    try:
        database = server.create_database()
        a, b = (DacheProcess(database.env).start(timeout=60) for _ in range(2))
        for watchers in (1, 1000):
            same, across = latency(a, b, watchers, writes, len(rows))
            rows.append((watchers, same, across, writes))
            print(f"  {watchers} watchers: done", file=sys.stderr)
        a.terminate()
        b.terminate()
    finally:
        server.destroy()

    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT)
    rates: dict[str, list[float]] = {
        "none": [],
        "1000 of another prefix": [],
        "1000 of the written prefix": [],
    }
    node = DacheProcess({"DURABILITY_ENGINE": "memory"}, ()).start()
    pinned_node = subprocess.run(["taskset", "-pc", "0", str(node.proc.pid)], capture_output=True)
    try:
        for _ in range(repeats):
            for name, count, request in (
                ("none", 0, WATCH),
                ("1000 of another prefix", 1000, WATCH.replace(b"prefix=bench", b"prefix=x")),
                ("1000 of the written prefix", 1000, WATCH),
            ):
                drain = Drain([open_watch(node.port, request) for _ in range(count)])
                rates[name].append(wrk_rate(node.port, seconds, script.name))
                drain.close()
    finally:
        node.terminate()
        os.unlink(script.name)

    print(f"\nload average before the run: {' '.join(f'{v:.2f}' for v in load_average)}")
    print("(a shared 2-core machine: figures are noisy; compare within one run)")
    print("\n### Event delivery latency (write's 204 on A -> event received), ms\n")
    print("| watchers per node | path | p50 | p99 | max | received |")
    print("|---|---|---|---|---|---|")
    for watchers, same, across, count in rows:
        for name, values in (("same node (A -> A)", same), ("across nodes (A -> B)", across)):
            print(
                f"| {watchers} | {name} | {percentile(values, 50):.2f} "
                f"| {percentile(values, 99):.2f} | {max(values):.2f} | {len(values)}/{count} |"
            )
    base = statistics.median(rates["none"])
    print(
        f"\n### Write throughput, memory engine, wrk -c16 SET, {seconds} s, median of {repeats}\n"
    )
    print("| watchers | req/s (median) | ratio | runs |")
    print("|---|---|---|---|")
    for name, results in rates.items():
        rate = statistics.median(results)
        runs = ", ".join(f"{r:,.0f}" for r in results)
        print(f"| {name} | {rate:,.0f} | {rate / base:.2f} | {runs} |")
    if pinned_node.returncode:
        print("(the node could not be pinned to core 0)")


if __name__ == "__main__":
    main()
