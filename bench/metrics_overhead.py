"""
What metrics cost on the hot path: GET throughput of one key with METRICS=true
vs METRICS=false, measured with wrk against `twistd -n dache`.

The server is pinned to CPU 0 and wrk to CPU 1 (taskset), each setting is
started fresh for every run, the two alternate (on/off, then off/on) so drift
on a shared machine hits both alike, and the table reports medians. Besides
requests per second it reports the server's CPU time per request (from
/proc/<pid>/stat around the wrk run); then the same GET served in this process
by DacheSite without sockets, metrics on and off in alternating blocks; and
the cost of the metrics hook alone. On a machine shared with other work the
last two are the steadiest figures.

    .venv/bin/python -m bench.metrics_overhead            # 7 rounds of 10 s
    .venv/bin/python -m bench.metrics_overhead --quick    # 3 rounds of 3 s

Needs wrk (`apt-get install wrk`) and taskset (util-linux).
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import timeit
from collections.abc import Callable

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
LISTENING = re.compile(r"listening on tcp:[^:]+:(\d+)")
VALUE = b'{"value": {"name": "a cached thing", "tags": ["x", "y", "z"], "n": 12345}}'


class Server:
    def __init__(self, metrics: bool, cpu: int):
        command = ["taskset", "-c", str(cpu), TWISTD, "-n", "--pidfile=", "dache"]
        command += ["--listen=tcp:0:interface=127.0.0.1", f"--metrics={str(metrics).lower()}"]
        self.proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.port = self._wait_listening()

    def _wait_listening(self) -> int:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 30
        for line in self.proc.stdout:
            match = LISTENING.search(line)
            if match:
                return int(match.group(1))
            if time.monotonic() > deadline:
                break
        self.stop()
        raise RuntimeError("dache did not start listening")

    def request(self, method: str, path: str, body: bytes | None = None) -> int:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request(method, path, body=body)
            response = connection.getresponse()
            response.read()
            return response.status
        finally:
            connection.close()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(port: int, seconds: float, connections: int, cpu: int) -> tuple[float, int]:
    """(requests per second, requests) of GET /dache/bench."""
    command = ["taskset", "-c", str(cpu), "wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s"]
    command.append(f"http://127.0.0.1:{port}/dache/bench")
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out:
        raise RuntimeError("wrk saw errors:\n" + out)
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    return rate, int(re.search(r"(\d+) requests in", out).group(1))


def run_one(metrics: bool, seconds: float, connections: int) -> tuple[float, float]:
    """(requests per second, server CPU microseconds per request)."""
    server = Server(metrics, cpu=0)
    try:
        assert server.request("POST", "/dache/bench", VALUE) == 204
        wrk(server.port, 1, connections, cpu=1)  # warm-up
        cpu_before = cpu_seconds(server.proc.pid)
        rate, requests = wrk(server.port, seconds, connections, cpu=1)
        cpu = cpu_seconds(server.proc.pid) - cpu_before
        return rate, 1e6 * cpu / requests
    finally:
        server.stop()


def hook_microseconds() -> float:
    """CPU cost of the per-request metrics hook alone (what DacheSite.log adds), in µs."""
    from dache.testing import MemoryNode
    from dache.web.metrics import Metrics

    node = MemoryNode()
    metrics = Metrics(node.cache, node.committer, node.api.monitor, process=False)
    received_at = time.perf_counter()

    def hook() -> None:  # as DacheSite.log: one perf_counter() and request_finished()
        metrics.request_finished(b"GET", b"/dache/bench", 200, time.perf_counter() - received_at)

    n = 200_000
    best = min(timeit.repeat(hook, number=n, repeat=7))
    # DacheRequest.requestReceived adds one more perf_counter() per request.
    best += min(timeit.repeat(time.perf_counter, number=n, repeat=7))
    return 1e6 * best / n


def in_process(blocks: int = 40, per_block: int = 3000) -> tuple[float, float]:
    """
    Microseconds per GET with metrics on and off, served by DacheSite in this
    process (HTTP parsing, the resource, the response; no sockets), in
    alternating blocks so other load on the machine hits both alike. Medians.
    """
    from twisted.internet.address import IPv4Address
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from dache.testing import MemoryNode
    from dache.web.metrics import Metrics
    from dache.web.site import DacheSite

    request = b"GET /dache/bench HTTP/1.1\r\nHost: dache\r\n\r\n"

    def connection(metrics_on: bool) -> Callable[[], None]:
        node = MemoryNode()
        node.cache.set("bench", VALUE)
        metrics = None
        if metrics_on:
            metrics = Metrics(node.cache, node.committer, node.api.monitor, process=False)
        site = DacheSite(node.api.resource(), metrics=metrics, reactor=Clock())
        protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        protocol.makeConnection(transport)

        def one() -> None:
            protocol.dataReceived(request)
            transport.clear()

        return one

    serve = {True: connection(True), False: connection(False)}
    timings: dict[bool, list[float]] = {True: [], False: []}
    for i in range(blocks):
        for metrics_on in (True, False) if i % 2 == 0 else (False, True):
            one = serve[metrics_on]
            began = time.process_time()  # CPU time: not the time other work held the CPU
            for _ in range(per_block):
                one()
            timings[metrics_on].append(1e6 * (time.process_time() - began) / per_block)
    return statistics.median(timings[True]), statistics.median(timings[False])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="3 rounds of 3 s")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds = 3, 3
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (apt-get install {tool})")

    rates: dict[bool, list[float]] = {True: [], False: []}
    costs: dict[bool, list[float]] = {True: [], False: []}
    print("| round | on: req/s | off: req/s | on/off | on: CPU µs/req | off: CPU µs/req |")
    print("|---:|---:|---:|---:|---:|---:|")
    for i in range(args.rounds):
        order = (True, False) if i % 2 == 0 else (False, True)
        for metrics in order:
            rate, cost = run_one(metrics, args.seconds, args.connections)
            rates[metrics].append(rate)
            costs[metrics].append(cost)
        on, off = rates[True][-1], rates[False][-1]
        print(
            f"| {i + 1} | {on:,.0f} | {off:,.0f} | {on / off:.3f} "
            f"| {costs[True][-1]:.1f} | {costs[False][-1]:.1f} |",
            flush=True,
        )
    on, off = statistics.median(rates[True]), statistics.median(rates[False])
    cost_on, cost_off = statistics.median(costs[True]), statistics.median(costs[False])
    print(
        f"| **median** | **{on:,.0f}** | **{off:,.0f}** | **{on / off:.3f}** "
        f"| **{cost_on:.1f}** | **{cost_off:.1f}** |"
    )
    print(f"\nthroughput: metrics on/off = {on / off:.3f} (median req/s)")
    print(
        f"server CPU per GET: {cost_on:.1f} µs on, {cost_off:.1f} µs off "
        f"({100 * (cost_on / cost_off - 1):+.1f}%, medians)"
    )
    inproc_on, inproc_off = in_process()
    print(
        f"in process (DacheSite, no sockets, alternating blocks): {inproc_on:.1f} µs per GET on, "
        f"{inproc_off:.1f} µs off ({100 * (inproc_on / inproc_off - 1):+.1f}%, medians)"
    )
    hook = hook_microseconds()
    print(
        f"the metrics hook alone: {hook:.2f} µs per request "
        f"= {100 * hook / cost_off:.1f}% of the CPU a GET costs with metrics off"
    )


if __name__ == "__main__":
    main()
