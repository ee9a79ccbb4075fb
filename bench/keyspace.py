"""
The key space's figures (`python -m bench.keyspace [--quick]`, part of `make
bench`), written to bench/RESULTS-keyspace.md:

- the sorted key index's memory per entry and its add/discard cost (in process);
- list-page latency (GET /dache?prefix=&limit=100&after=<random key>), p50/p99,
  at 1M keys;
- multi-get: 100 keys in one POST /dache batch against 100 single GETs, as
  keys per second over one keep-alive connection (target >= 10x);
- increments of one key (PATCH {"increment": 1}) per second, from 4 clients.

The server (disk engine, DISK_FSYNC=no, filled by bench.fill) is pinned to
core 0 and the Python clients to core 1. Every figure is a median over rounds
taken side by side in one run: on a shared machine only ratios are worth
comparing across runs. Webdis + Redis (appendonly no, as DISK_FSYNC=no is not
durable either), pinned like dache, answers MGET of the same 100 keys over
/MGET/k1/.../k100, measured in the same rounds.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from http.client import HTTPConnection

from bench.fill import key_of
from bench.peers import Webdis, preload_redis
from bench.servers import LOAD_CPU, Server, dache, pinned
from dache.store.keyindex import KeyIndex

HERE = os.path.dirname(os.path.abspath(__file__))


def index_memory(entries: int) -> dict[str, float]:
    """Bytes per entry the index adds over the keys themselves, and its costs."""
    keys = [key_of(i) for i in range(entries)]
    random.Random(1).shuffle(keys)
    gc.collect()
    tracemalloc.start()
    began = time.perf_counter()
    index = KeyIndex(keys)
    build = time.perf_counter() - began
    size, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    extra = [f"x{i:07d}" for i in range(10_000)]
    began = time.perf_counter()
    for key in extra:
        index.add(key)
    add = (time.perf_counter() - began) / len(extra)
    began = time.perf_counter()
    for key in extra:
        index.discard(key)
    discard = (time.perf_counter() - began) / len(extra)
    return {
        "bytes_per_entry": size / entries,
        "build_seconds": build,
        "add_us": add * 1e6,
        "discard_us": discard * 1e6,
    }


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def call(connection: HTTPConnection, method: str, path: str, body: bytes | None = None) -> bytes:
    connection.request(method, path, body=body)
    response = connection.getresponse()
    data = response.read()
    assert response.status in (200, 204), (response.status, data[:200])
    return data


def list_pages(port: int, entries: int, pages: int) -> list[float]:
    connection = HTTPConnection("127.0.0.1", port, timeout=30)
    rng = random.Random(2)
    latencies = []
    for _ in range(pages):
        after = key_of(rng.randrange(entries))
        began = time.perf_counter()
        data = call(connection, "GET", f"/dache?prefix=k&limit=100&after={after}")
        latencies.append(time.perf_counter() - began)
        assert data.count(b'"key"') == 100 or after >= key_of(entries - 100)
    return latencies


def multi_get(port: int, entries: int, rounds: int) -> tuple[float, float]:
    """Keys per second: (one batch of 100 gets, 100 single GETs)."""
    connection = HTTPConnection("127.0.0.1", port, timeout=30)
    rng = random.Random(3)
    batch_seconds = single_seconds = 0.0
    for _ in range(rounds):
        keys = [key_of(rng.randrange(entries)) for _ in range(100)]
        body = json.dumps({"ops": [{"op": "get", "key": k} for k in keys]}).encode()
        began = time.perf_counter()
        call(connection, "POST", "/dache", body)
        batch_seconds += time.perf_counter() - began
        began = time.perf_counter()
        for key in keys:
            call(connection, "GET", "/dache/" + key)
        single_seconds += time.perf_counter() - began
    return 100 * rounds / batch_seconds, 100 * rounds / single_seconds


def webdis_mget(port: int, entries: int, rounds: int) -> float:
    """Keys per second: Webdis MGET of 100 random keys (the same draw as multi_get)."""
    connection = HTTPConnection("127.0.0.1", port, timeout=30)
    rng = random.Random(3)
    seconds = 0.0
    for _ in range(rounds):
        keys = [key_of(rng.randrange(entries)) for _ in range(100)]
        began = time.perf_counter()
        data = call(connection, "GET", "/MGET/" + "/".join(keys))
        seconds += time.perf_counter() - began
        assert data.count(b"xx") >= 100, data[:200]  # every key found
    return 100 * rounds / seconds


def increments(port: int, seconds: float, clients: int = 4) -> tuple[float, int]:
    counts = [0] * clients
    stop = time.monotonic() + seconds

    def run(i: int) -> None:
        connection = HTTPConnection("127.0.0.1", port, timeout=30)
        while time.monotonic() < stop:
            call(connection, "PATCH", "/dache/counter", b'{"increment": 1}')
            counts[i] += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.monotonic() - began), sum(counts)


def pin_self() -> None:
    if hasattr(os, "sched_setaffinity") and LOAD_CPU < (os.cpu_count() or 1):
        os.sched_setaffinity(0, {LOAD_CPU})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.keyspace")
    parser.add_argument("--quick", action="store_true", help="100k keys, fewer rounds")
    parser.add_argument("--entries", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args(argv)
    entries = args.entries or (100_000 if args.quick else 1_000_000)
    rounds = args.rounds or (3 if args.quick else 5)
    pin_self()
    load_before = os.getloadavg()[0]

    memory = index_memory(entries)
    print(f"index: {memory}", flush=True)
    workdir = tempfile.mkdtemp(prefix="dache-bench-keyspace-")
    env = {"DURABILITY_ENGINE": "disk", "DISK_PATH": workdir, "DISK_FSYNC": "no"}
    subprocess.run(
        pinned(LOAD_CPU, [sys.executable, "-m", "bench.fill", str(entries)]),
        env={**os.environ, **env},
        check=True,
    )
    webdis = Webdis("webdis-keyspace", os.path.join(workdir, "webdis"), "no").start()
    server: Server | None = None
    try:
        # The same keys and value text (dache's value is the JSON string of these bytes).
        preload_redis(webdis.redis, [key_of(i) for i in range(entries)], b"x" * 98)
        server = dache("dache-keyspace", env).start(timeout=300)
        p50s, p99s, ratios, batch_rates, single_rates, inc_rates = [], [], [], [], [], []
        mget_rates, mget_ratios = [], []
        for _ in range(rounds):
            latencies = list_pages(server.port, entries, 300)
            p50s.append(percentile(latencies, 50))
            p99s.append(percentile(latencies, 99))
            batch, single = multi_get(server.port, entries, 30)
            batch_rates.append(batch)
            single_rates.append(single)
            ratios.append(batch / single)
            mget_rates.append(webdis_mget(webdis.port, entries, 30))
            mget_ratios.append(batch / mget_rates[-1])
            inc_rates.append(increments(server.port, 3.0)[0])
            print(f"round: p50 {p50s[-1] * 1e3:.2f} ms, multi-get {ratios[-1]:.1f}x", flush=True)
        status, body = server.request("GET", "/dache/counter")
        assert status == 200
    finally:
        if server is not None:
            server.stop()
        webdis.stop()
    median = statistics.median
    lines = [
        "# Key space benchmark",
        "",
        f"`python -m bench.keyspace{' --quick' if args.quick else ''}`: {entries:,} keys "
        f"(disk engine, DISK_FSYNC=no), {rounds} rounds, medians. Server pinned to core "
        f"{0}, Python clients to core {LOAD_CPU}; 1-minute load average before the run: "
        f"{load_before:.2f}. Compare ratios, not absolute figures, across runs.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| sorted index, memory per entry (beyond the key itself) | "
        f"{memory['bytes_per_entry']:.1f} bytes |",
        f"| sorted index, build from {entries:,} unsorted keys | {memory['build_seconds']:.2f} s |",
        f"| sorted index, add / discard one key | {memory['add_us']:.2f} / "
        f"{memory['discard_us']:.2f} us |",
        f"| list page (limit=100, random `after`) p50 | {median(p50s) * 1e3:.2f} ms |",
        f"| list page (limit=100, random `after`) p99 | {median(p99s) * 1e3:.2f} ms |",
        f"| multi-get, 100 keys in one batch | {median(batch_rates):,.0f} keys/s |",
        f"| 100 single GETs, one keep-alive connection | {median(single_rates):,.0f} keys/s |",
        f"| multi-get / single GETs | {median(ratios):.1f}x (target >= 10x) |",
        f"| increments of one key, 4 clients (PATCH) | {median(inc_rates):,.0f} /s |",
        f"| Webdis + Redis MGET of the same 100 keys | {median(mget_rates):,.0f} keys/s |",
        f"| multi-get / Webdis + Redis MGET | {median(mget_ratios):.2f}x (target >= 1.0x) |",
        "",
    ]
    text = "\n".join(lines)
    with open(os.path.join(HERE, "RESULTS-keyspace.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
