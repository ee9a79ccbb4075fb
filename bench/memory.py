"""
What MAX_MEMORY costs (issue 11), measured in this process: requests served
by DacheSite without sockets (HTTP parsing, the resource, the committer, the
memory engine, the response), two settings in alternating blocks so other
load on the machine hits both alike, CPU time per request, medians:

- GET with an LRU policy / GET with noeviction (target >= 0.95): the LRU
  read stores the clock tick in the entry;
- SET at the bound, evicting on every write / SET below it (target >= 0.8);

the bytes an entry costs beyond its key and value: the RSS growth of a child
process filling a bare Cache with N entries of 100-byte values, with and
without an LRU bound's bookkeeping; and dache against Redis side by side
(issue 23): RSS per entry and start-up load of 1,000,000 entries, dache's
disk engine (bench.startup) and Redis on its AOF (bench.peers). Writes
bench/RESULTS-memory.md (--out: another directory).

    .venv/bin/python -m bench.memory            # 40 blocks, 300,000 / 1,000,000 entries
    .venv/bin/python -m bench.memory --quick    # 10 blocks, 100,000 / 100,000 entries
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))

VALUE = b'{"value": "' + b"x" * 98 + b'"}'  # a 100-byte JSON value
KEYS = 1000


def _connection(policy: str, max_memory: int, method: str) -> Callable[[], None]:
    from twisted.internet.address import IPv4Address
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from dache.testing import MemoryNode
    from dache.web.site import DacheSite

    node = MemoryNode(max_memory=max_memory, eviction_policy=policy)
    for i in range(KEYS):
        node.committer.submit(node_change(f"k{i}"))
    site = DacheSite(node.api.resource(), reactor=Clock())
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    protocol.makeConnection(transport)
    counter = [0]
    head = b"Host: dache\r\nContent-Length: %d\r\n\r\n" % len(VALUE)

    def get() -> None:
        counter[0] += 1
        key = b"k%d" % (counter[0] % KEYS)
        protocol.dataReceived(b"GET /dache/%b HTTP/1.1\r\nHost: dache\r\n\r\n" % key)
        transport.clear()

    def post() -> None:  # a new key every time: at the bound, each one evicts
        counter[0] += 1
        protocol.dataReceived(b"POST /dache/n%d HTTP/1.1\r\n" % counter[0] + head + VALUE)
        transport.clear()

    return get if method == "GET" else post


def node_change(key: str):  # type: ignore[no-untyped-def]
    from dache.engines import Change

    return Change.set(key, json.loads(VALUE)["value"].join('""').encode())


def alternate(
    serve: dict[str, Callable[[], None]], blocks: int, per_block: int
) -> dict[str, float]:
    """Median CPU microseconds per request of each setting, in alternating blocks."""
    timings: dict[str, list[float]] = {name: [] for name in serve}
    names = list(serve)
    for i in range(blocks):
        for name in names if i % 2 == 0 else reversed(names):
            one = serve[name]
            began = time.process_time()
            for _ in range(per_block):
                one()
            timings[name].append(1e6 * (time.process_time() - began) / per_block)
    return {name: statistics.median(values) for name, values in timings.items()}


FILL = """
import sys
from dache.store.cache import Cache
from dache.store.eviction import MemoryBound

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

count, policy = int(sys.argv[1]), sys.argv[2]
cache = Cache()
if policy != "none":
    MemoryBound(cache, 1 << 40, policy)
value = b'"' + b"x" * 98 + b'"'
before = rss()
for i in range(count):
    cache.set("key-%010d" % i, value, None, i + 1)
print((rss() - before) / count, len("key-%010d" % 0) + len(value))
"""


def per_entry(count: int, policy: str) -> float:
    """RSS bytes per entry beyond its key and value."""
    out = subprocess.run(
        [sys.executable, "-c", FILL, str(count), policy], capture_output=True, text=True, check=True
    ).stdout.split()
    return float(out[0]) - float(out[1])


def peers_table(entries: int) -> list[str]:
    """dache's disk engine and Redis, each loaded with `entries`: report.py's table."""
    from bench import peers, report, startup

    with tempfile.TemporaryDirectory(prefix="dache-bench-memory-") as workdir:
        try:
            dache = startup.measure("disk", workdir, entries)
        finally:
            startup.cleanup()
        try:
            redis = peers.measure_redis_startup(workdir, entries)
        except Exception as e:  # noqa: BLE001 - reported in the table, the rest still written
            redis = peers.RedisStartup(entries, error=str(e)[-500:])
    lines = [
        line.replace("the disk engine's figures from the start-up table below", "the disk engine's")
        for line in report._memory_markdown([dache], redis)
    ]
    overhead = dache.overhead_per_entry
    redis_overhead = None if redis.bytes_per_entry is None else redis.bytes_per_entry - 108
    lines.insert(
        -2,  # after the table's last row, before its closing note
        f"| overhead per entry beyond key and value, B | {report._fmt(overhead, 0, '')} | "
        f"{report._fmt(redis_overhead, 0, '')} | "
        f"{report._fmt(report._over(overhead, redis_overhead))} |",
    )
    if dache.error:
        lines.insert(1, f"dache: error: {dache.error}\n")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=40)
    parser.add_argument("--entries", type=int, default=300_000)
    parser.add_argument("--peer-entries", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="10 blocks, 100,000 entries")
    parser.add_argument("--out", default=HERE, help="directory for RESULTS-memory.md")
    parser.add_argument("--no-peers", action="store_true", help="skip dache against Redis")
    args = parser.parse_args()
    if args.quick:
        args.blocks, args.entries, args.peer_entries = 10, 100_000, 100_000
    began = time.monotonic()
    bound = 200 * KEYS  # room for about 500 entries of this size: the fill already evicts
    gets = alternate(
        {
            "lru": _connection("allkeys-lru", 1 << 40, "GET"),
            "lfu": _connection("allkeys-lfu", 1 << 40, "GET"),
            "noeviction": _connection("noeviction", 0, "GET"),
        },
        args.blocks,
        3000,
    )
    sets = alternate(
        {
            "at the bound": _connection("allkeys-lru", bound, "POST"),
            "below it": _connection("allkeys-lru", 1 << 40, "POST"),
        },
        args.blocks,
        1000,
    )
    out: list[str] = []
    out.append("| scenario | µs/request (CPU, median) | ratio (throughput) | target |")
    out.append("|---|---:|---:|---:|")
    out.append(f"| GET with allkeys-lru | {gets['lru']:.2f} | | |")
    out.append(f"| GET with noeviction | {gets['noeviction']:.2f} | | |")
    out.append(f"| GET with allkeys-lfu | {gets['lfu']:.2f} | | |")
    out.append(f"| GET LRU / GET noeviction | | {gets['noeviction'] / gets['lru']:.3f} | >= 0.95 |")
    out.append(f"| GET LFU / GET noeviction | | {gets['noeviction'] / gets['lfu']:.3f} | |")
    out.append(f"| SET at the bound (evicting on every write) | {sets['at the bound']:.2f} | | |")
    out.append(f"| SET below the bound | {sets['below it']:.2f} | | |")
    ratio = sets["below it"] / sets["at the bound"]
    out.append(f"| SET at the bound / SET below it | | {ratio:.3f} | >= 0.8 |")
    out.append("")
    out.append(
        f"| bytes per entry beyond key and value ({args.entries:,} entries, 100 B values) | B |"
    )
    out.append("|---|---:|")
    for policy in ("none", "allkeys-lru", "volatile-lru"):
        out.append(f"| Cache, {policy} | {per_entry(args.entries, policy):.0f} |")

    if not args.no_peers:
        out.append("")
        out.extend(peers_table(args.peer_entries))
    command = "python -m bench.memory" + (" --quick" if args.quick else "")
    head = [
        "# Memory: what an entry costs, what the bound costs (issues 11, 23)",
        "",
        f"`{command}`, run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} in "
        f"{time.monotonic() - began:.0f} s (load average {os.getloadavg()[0]:.1f} at the end). "
        "Request figures: CPU time per request served in process by DacheSite, the settings "
        "alternating block by block; the ratios are the steadiest part.",
        "",
    ]
    text = "\n".join(head + out) + "\n"
    sys.stdout.write(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "RESULTS-memory.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
