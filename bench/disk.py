"""
The disk engine's costs, side by side with the memory engine, in one run:

    .venv/bin/python -m bench.disk [--seconds 5] [--repeat 3] [--entries 1000000]

1. SET throughput over HTTP: `twistd -n dache` pinned to CPU 0, wrk (one
   thread) pinned to CPU 1, POSTing 100-byte values over 10,000 keys at 1, 16
   and 64 connections, against DURABILITY_ENGINE=memory and against
   DURABILITY_ENGINE=disk with DISK_FSYNC=always; runs interleaved, medians of
   --repeat.
2. Replay: DiskEngine.load of a log of --entries sets into the cache, as at
   start-up.
3. Compaction: a log of --entries keys each set twice (so twice the live
   data), compacted; also the longest the event loop went unserved meanwhile.

Needs wrk (`apt-get install wrk`) and taskset. Prints markdown tables.
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
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import LoopingCall, react

from dache.engines import SET, Change
from dache.engines.disk import LOG_NAME, DiskEngine
from dache.engines.disklog import encode_header, encode_set, frame
from dache.store.cache import Cache

SERVER_CPU, LOAD_CPU = "0", "1"
CONNECTIONS = (1, 16, 64)
VALUE = b'"' + b"x" * 98 + b'"'  # 100 bytes of JSON
LISTENING = re.compile(r"listening on tcp:[^:]+:(\d+)")

WRK_SCRIPT = """
local counter = 0
local headers = {["Content-Type"] = "application/json"}
local body = '{"value": "' .. string.rep("x", 98) .. '"}'
request = function()
  counter = counter + 1
  return wrk.format("POST", "/dache/k" .. (counter % 10000), headers, body)
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d %d\\n", summary.requests, summary.duration,
    e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


# -- 1. SET throughput over HTTP


class Server:
    def __init__(self, engine: str, directory: str):
        env = {
            **os.environ,
            "DURABILITY_ENGINE": engine,
            "DISK_PATH": os.path.join(directory, engine),
            "DISK_FSYNC": "always",
        }
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        command = ["taskset", "-c", SERVER_CPU, twistd, "-n", "--pidfile=", "dache"]
        command.append("--listen=tcp:0:interface=127.0.0.1")
        self.engine = engine
        self.proc = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for line in self.proc.stdout:
            match = LISTENING.search(line)
            if match:
                self.port = int(match.group(1))
                break
        else:
            raise RuntimeError(f"dache ({engine}) did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.communicate(timeout=30)


def wrk(port: int, connections: int, seconds: int, script: str) -> dict[str, float]:
    command = ["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{connections}"]
    command += [f"-d{round(seconds)}s", "--timeout=5s", "-s", script, f"http://127.0.0.1:{port}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            requests, micros, non2xx, errors, p50, p99 = map(int, line.split()[1:])
            if non2xx or errors:
                raise RuntimeError(f"wrk: {non2xx} non-2xx answers, {errors} socket errors")
            return {"rps": requests / (micros / 1e6), "p50": p50 / 1000, "p99": p99 / 1000}
    raise RuntimeError(f"wrk printed no result:\n{done.stdout}\n{done.stderr}")


def bench_sets(seconds: int, repeat: int) -> str:
    if shutil.which("wrk") is None:
        raise SystemExit("bench.disk needs wrk: apt-get install wrk")
    directory = tempfile.mkdtemp(prefix="dache-bench-disk-")
    script = os.path.join(directory, "set.lua")
    with open(script, "w") as f:
        f.write(WRK_SCRIPT)
    servers = {engine: Server(engine, directory) for engine in ("memory", "disk")}
    samples: dict[tuple[str, int], list[dict[str, float]]] = {}
    try:
        for server in servers.values():
            wrk(server.port, 16, 1, script)  # warm up
        for _ in range(repeat):
            for connections in CONNECTIONS:
                for engine, server in servers.items():
                    sample = wrk(server.port, connections, seconds, script)
                    samples.setdefault((engine, connections), []).append(sample)
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(directory, ignore_errors=True)

    def median(engine: str, connections: int, field: str) -> float:
        return statistics.median(s[field] for s in samples[(engine, connections)])

    rows = [
        "| connections | memory SET/s | disk (fsync always) SET/s | disk / memory "
        "| memory p50 / p99 ms | disk p50 / p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for c in CONNECTIONS:
        memory, disk = median("memory", c, "rps"), median("disk", c, "rps")
        rows.append(
            f"| {c} | {memory:,.0f} | {disk:,.0f} | {disk / memory:.2f} "
            f"| {median('memory', c, 'p50'):.2f} / {median('memory', c, 'p99'):.2f} "
            f"| {median('disk', c, 'p50'):.2f} / {median('disk', c, 'p99'):.2f} |"
        )
    return "\n".join(rows)


# -- 2 and 3. replay and compaction, in this process


def write_log(path: str, entries: int, passes: int) -> None:
    """A log of `entries` keys, each set `passes` times, 1,000 changes per record."""
    revision = 0
    with open(path, "wb") as f:
        f.write(encode_header(0))
        for _ in range(passes):
            for start in range(0, entries, 1000):
                parts = []
                for i in range(start, min(start + 1000, entries)):
                    revision += 1
                    parts.append(encode_set(b"key-%07d" % i, VALUE, None, revision))
                f.write(frame(b"".join(parts)))


def applier(cache: Cache) -> Any:
    def apply(change: Change) -> None:  # as dache.service applies a loaded change
        if change.kind == SET:
            cache.set(change.key, change.value_json, change.expiry, change.revision)
        else:
            cache.delete(change.key)

    return apply


@inlineCallbacks
def replay_and_compact(reactor: Any, entries: int, repeat: int) -> Any:
    directory = tempfile.mkdtemp(prefix="dache-bench-replay-")
    path = os.path.join(directory, LOG_NAME)
    replays, compactions, stalls = [], [], []
    try:
        write_log(path, entries, passes=1)
        replay_size = os.path.getsize(path)
        for _ in range(repeat):
            cache = Cache()
            engine = DiskEngine(directory, reactor)
            began = time.perf_counter()
            yield engine.load(applier(cache))
            replays.append(time.perf_counter() - began)
            assert len(cache) == entries
            yield engine.close()

        write_log(path, entries, passes=2)
        for _ in range(repeat):
            shutil.copyfile(path, path + ".bench")
            cache = Cache()
            engine = DiskEngine(directory, reactor)
            yield engine.load(applier(cache))
            engine.attach(cache)
            before = os.path.getsize(path)
            stall = [0.0, time.perf_counter()]

            def tick(stall: list[float] = stall) -> None:
                now = time.perf_counter()
                stall[0] = max(stall[0], now - stall[1] - 0.01)
                stall[1] = now

            ticker = LoopingCall(tick)
            ticker.start(0.01)
            began = time.perf_counter()
            switched = yield engine.compact()
            compactions.append(time.perf_counter() - began)
            ticker.stop()
            stalls.append(stall[0])
            assert switched
            after = os.path.getsize(path)
            yield engine.close()
            os.replace(path + ".bench", path)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(f"\n## Replay and compaction ({entries:,} entries of 100-byte values)\n")
    rows = [
        f"| measure | median of {repeat} | note |",
        "|---|---|---|",
        f"| replay {entries:,} entries | {statistics.median(replays):.2f} s "
        f"| log of {replay_size / 1e6:.0f} MB, into the cache as at start-up |",
        f"| compaction of {entries:,} live entries | {statistics.median(compactions):.2f} s "
        f"| log {before / 1e6:.0f} MB -> {after / 1e6:.0f} MB |",
        f"| longest event-loop stall during compaction | {statistics.median(stalls) * 1000:.0f} ms "
        "| a 10 ms timer's lateness |",
    ]
    print("\n".join(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5, help="per wrk run")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--skip-http", action="store_true")
    args = parser.parse_args()
    print(f"# bench.disk  (CPUs: {os.cpu_count()}, dache on CPU {SERVER_CPU}, wrk on {LOAD_CPU})")
    if not args.skip_http:
        print("\n## SET throughput\n")
        print(bench_sets(args.seconds, args.repeat), flush=True)
    react(lambda reactor: replay_and_compact(reactor, args.entries, args.repeat))


if __name__ == "__main__":
    main()
