"""
`make bench` (= `python -m bench.run [--quick]`): start every server pinned to
core 0, load each from wrk pinned to core 1, and write bench/RESULTS.md and
bench/results.png.

Scenarios run in rounds: every scenario once per round, a warm-up before each
measured run, so the noise of a shared machine is spread across all of them
and the side-by-side ratios stay honest. Medians over the rounds are reported.
Scenarios for an engine dache does not have yet are listed as not available.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from bench import peers, report, startup
from bench.load import Sample, run_wrk
from bench.neighbours import Meter
from bench.scenarios import (
    KEYS,
    WHOLE_MACHINE_KINDS,
    Scenario,
    hit_key,
    set_body,
    value_of,
    write_request_file,
)
from bench.servers import Etcd, Server, ceiling, dache
from dache.config import SETTINGS
from dache.engines import REGISTRY

HERE = os.path.dirname(os.path.abspath(__file__))
SETTLE_SECONDS = 3


@dataclass
class Mode:
    name: str
    rounds: int
    seconds: int  # wrk takes whole seconds
    warmup: int
    connections: tuple[int, ...]
    value_sizes: tuple[int, ...]
    startup_entries: int

    resp_requests: int  # per redis-benchmark test


FULL = Mode("full", 4, 2, 1, (1, 16, 64, 256), (100, 10240), 1_000_000, 100_000)
QUICK = Mode("quick", 1, 1, 1, (64, 256), (100,), 20_000, 5_000)

# kind -> target server; value sizes it runs with (None: every size). The order
# is the order of the runs within a group and of the chart's bars: each peer
# right after the dache scenario it is compared with.
KIND_TARGETS: dict[str, tuple[str, tuple[int, ...] | None]] = {
    "ceiling GET": ("ceiling-{size}", None),
    "ceiling POST": ("ceiling-{size}", None),
    "GET hit": ("dache-memory", None),
    "webdis GET": ("webdis-no", None),
    "GET hit, metrics off": ("dache-no-metrics", (100,)),
    "GET miss": ("dache-memory", (100,)),
    "SET memory": ("dache-memory", None),
    "webdis SET no": ("webdis-no", None),
    "SET disk everysec": ("dache-disk-everysec", None),
    "webdis SET everysec": ("webdis-everysec", None),
    "SET disk": ("dache-disk", None),
    "webdis SET always": ("webdis-always", None),
    "SET postgres": ("dache-postgres", None),
    "DELETE": ("dache-memory", (100,)),
    "90/10 mix": ("dache-memory", None),
    "etcd range": ("etcd", None),
    "etcd put": ("etcd", None),
    # the whole machine: see bench.scenarios.WHOLE_MACHINE_KINDS
    "GET hit, 2 workers": ("dache-2-workers", None),
    "webdis GET, 2 threads": ("webdis-2-threads", None),
    "SET postgres, 2 workers": ("dache-2-workers", None),
    "webdis SET always, 2 threads": ("webdis-2-threads", None),
}


# The hot path's kinds (issue 22) run at every connection count; the others
# not at WIDE_CONNECTIONS, which only they need.
WIDE_CONNECTIONS = 256
HOT_KINDS = ("ceiling GET", "ceiling POST", "GET hit", "SET memory", "DELETE")

# kind -> the connection counts it runs with, where not all of them
KIND_CONNECTIONS = {
    "GET hit, metrics off": (64,),
    **{kind: (64,) for kind in WHOLE_MACHINE_KINDS},
}


def runs_at(kind: str, connections: int) -> bool:
    """Whether a scenario of `kind` runs at `connections`."""
    if connections == WIDE_CONNECTIONS and kind not in HOT_KINDS:
        return False
    return connections in KIND_CONNECTIONS.get(kind, (connections,))


# the load generator on the whole machine: two threads, unpinned
WHOLE_MACHINE_WRK = {"threads": 2, "cpu": None}

# servers preloaded with the keys GET hit and the mix read, by kind of server
DACHE_PRELOADED = ("dache-memory", "dache-no-metrics", "dache-2-workers")


def has_setting(env: str) -> bool:
    return any(s.env == env for s in SETTINGS)


@dataclass
class Bench:
    mode: Mode
    workdir: str
    servers: dict[str, Server] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)  # kind -> why
    samples: dict[tuple[str, int, int], list[Sample]] = field(default_factory=dict)
    only: set[str] | None = None  # scenario kinds to run (None: all)
    # (Redis durability level, value size) -> one redis-benchmark result per round
    resp: dict[tuple[str, int], list[dict[str, peers.RespSample]]] = field(default_factory=dict)
    # other work's share of the machine during the rounds
    meter: Meter = field(
        default_factory=lambda: Meter(lambda: [os.getpid(), *startup.cluster_pids()])
    )

    # -- servers

    def factories(self) -> dict[str, Callable[[], Server] | str]:
        """Target name -> a server factory, or why the target is not available."""
        # dache as configured by default (metrics on, if it has them), memory engine.
        targets: dict[str, Callable[[], Server] | str] = {
            "dache-memory": lambda: dache("dache-memory", {"DURABILITY_ENGINE": "memory"}),
            "etcd": lambda: Etcd(tempfile.mkdtemp(prefix="etcd-", dir=self.workdir)),
        }
        for size in self.mode.value_sizes:
            targets[f"ceiling-{size}"] = lambda size=size: ceiling(size)
        if has_setting("METRICS"):
            targets["dache-no-metrics"] = lambda: dache(
                "dache-no-metrics", {"DURABILITY_ENGINE": "memory", "METRICS": "false"}
            )
        else:
            targets["dache-no-metrics"] = "no METRICS setting in dache.config yet"
        if "disk" in REGISTRY:
            targets["dache-disk"] = lambda: dache("dache-disk", startup.disk_env(self.workdir))
            targets["dache-disk-everysec"] = lambda: dache(
                "dache-disk-everysec", {**startup.disk_env(self.workdir), "DISK_FSYNC": "everysec"}
            )
        else:
            targets["dache-disk"] = "no disk engine in dache.engines.REGISTRY yet"
            targets["dache-disk-everysec"] = targets["dache-disk"]
        if "postgres" in REGISTRY:
            targets["dache-postgres"] = lambda: dache(
                "dache-postgres", startup.postgres_env(self.workdir)
            )
            # WORKERS > 1 needs the postgres engine: workers are nodes sharing its table
            targets["dache-2-workers"] = lambda: dache(
                "dache-2-workers",
                {**startup.postgres_env(self.workdir), "WORKERS": "2"},
                cpu=None,
            )
        else:
            targets["dache-postgres"] = "no postgres engine in dache.engines.REGISTRY yet"
            targets["dache-2-workers"] = targets["dache-postgres"]
        for fsync in peers.FSYNC_LEVELS:
            targets[f"webdis-{fsync}"] = lambda fsync=fsync: peers.Webdis(
                f"webdis-{fsync}", self._tempdir(f"webdis-{fsync}-"), fsync
            )
        targets["webdis-2-threads"] = lambda: peers.Webdis(
            "webdis-2-threads", self._tempdir("webdis-2-"), "always", threads=2, pinned_cpu=False
        )
        return targets

    def _tempdir(self, prefix: str) -> str:
        return tempfile.mkdtemp(prefix=prefix, dir=self.workdir)

    def scenarios(self) -> list[Scenario]:
        factories = self.factories()
        chosen = []
        for kind, (target, sizes) in KIND_TARGETS.items():
            if self.only is not None and kind not in self.only:
                continue
            for size in self.mode.value_sizes:
                if sizes is not None and size not in sizes:
                    continue
                name = target.format(size=size)
                if isinstance(factories[name], str):
                    self.missing[kind] = factories[name]
                    continue
                for connections in self.mode.connections:
                    if not runs_at(kind, connections):
                        continue
                    chosen.append(Scenario(kind, name, connections, size))
        # Side by side: each (connections, size) group runs together, ceiling first.
        order = list(KIND_TARGETS)
        chosen.sort(key=lambda s: (s.connections, s.value_bytes, order.index(s.kind)))
        return chosen

    def start(self, names: set[str]) -> None:
        factories = self.factories()
        for name in sorted(names):
            factory = factories[name]
            assert callable(factory)
            self.servers[name] = factory()  # kept before starting: stop() then stops it
        # every server at once: most of a start is waiting (imports, a PostgreSQL
        # connection, Redis), and `make bench QUICK=1` has 90 s for all of it
        log(f"starting {', '.join(self.servers)}")
        with ThreadPoolExecutor(max_workers=len(self.servers) or 1) as pool:
            for done in [pool.submit(server.start) for server in self.servers.values()]:
                done.result()
        # The keys that GET hit and the mix read (durable targets only take sets),
        # every server at once: etcd's fsync per put makes its preload the slowest.
        with ThreadPoolExecutor(max_workers=len(self.servers) or 1) as pool:
            loading = []
            for name, server in self.servers.items():
                if name in DACHE_PRELOADED:
                    loading.append(pool.submit(preload_dache, server, self.mode.value_sizes))
                elif name == "etcd":
                    loading.append(pool.submit(preload_etcd, server, self.mode.value_sizes))
                elif isinstance(server, peers.Webdis):
                    loading.append(pool.submit(preload_webdis, server, self.mode.value_sizes))
            for done in loading:
                done.result()
        time.sleep(SETTLE_SECONDS)  # let start-up and preload work (etcd's fsyncs) finish

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()

    # -- load

    def run(self) -> None:
        scenarios = self.scenarios()
        self.start({s.target for s in scenarios})
        self.meter.start()
        files = {s.key: write_request_file(self.workdir, s.kind, s.value_bytes) for s in scenarios}
        mode = self.mode
        for round_number in range(1, mode.rounds + 1):
            for scenario in scenarios:
                server = self.servers[scenario.target]
                path = files[scenario.key]
                wrk = WHOLE_MACHINE_WRK if scenario.kind in WHOLE_MACHINE_KINDS else {}
                run_wrk(server.url, path, scenario.connections, mode.warmup, **wrk)
                sample = run_wrk(
                    server.url, path, scenario.connections, mode.seconds, server.cpu_pids, **wrk
                )
                self.samples.setdefault(scenario.key, []).append(sample)
                log(
                    f"round {round_number}/{mode.rounds} {scenario.name:32} "
                    f"{sample.rps:9.0f} req/s  p50 {sample.p50_ms:7.2f} ms  "
                    f"p99 {sample.p99_ms:7.2f} ms  cpu {sample.cpu_us or 0:6.1f} us/req"
                    + (f"  non-2xx {sample.non2xx}" if sample.non2xx else "")
                    + (f"  errors {sample.errors}" if sample.errors else "")
                    + (f"  wrk {sample.load_share:.0%} of CPU" if sample.load_share else "")
                )
            self.run_resp(round_number)

    def run_resp(self, round_number: int) -> None:
        """redis-benchmark on the Redis behind each pinned Webdis: RESP's own limit."""
        for fsync, tests in RESP_TESTS.items():
            server = self.servers.get(f"webdis-{fsync}")
            if not isinstance(server, peers.Webdis):
                continue
            for size in self.mode.value_sizes:
                result = peers.redis_benchmark(
                    server.redis.redis_port, RESP_CONNECTIONS, size, self.mode.resp_requests, tests
                )
                self.resp.setdefault((fsync, size), []).append(result)
                log(
                    f"round {round_number}/{self.mode.rounds} redis-benchmark {fsync} {size} B: "
                    + ", ".join(
                        f"{test} {r.rps:.0f} req/s p99 {r.p99_ms:.2f} ms"
                        for test, r in result.items()
                    )
                )

    def profile(self) -> dict[str, str]:
        """py-spy's view of dache under GET hit and SET load: where the time goes."""
        from bench.profile import profile_server, summarize

        profiles = {}
        for kind, target in (
            ("GET hit", "dache-memory"),
            ("SET memory", "dache-memory"),
            ("SET disk", "dache-disk"),
        ):
            server = self.servers.get(target)
            if server is None:
                continue
            log(f"profiling {kind} with py-spy")
            try:
                sample, folded = profile_server(server, kind, 64, 100, 8, self.workdir)
            except Exception as e:  # noqa: BLE001 - a missing profile is reported, not fatal
                profiles[kind] = f"no profile: {e}"
                continue
            profiles[kind] = (
                f"{sample.rps:,.0f} req/s while sampled (py-spy slows it), "
                f"{sample.cpu_us or 0:.1f} µs CPU/req\n" + summarize(folded, 15)
            )
        return profiles

    def rss(self) -> dict[str, int]:
        return {name: server.rss_bytes() for name, server in self.servers.items()}


def preload_dache(server: Server, sizes: tuple[int, ...]) -> None:
    """The keys GET hit and the mix read: KEYS per value size."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        for size in sizes:
            body = set_body(size).encode()
            for i in range(KEYS):
                connection.request(
                    "POST", f"/dache/{hit_key(size, i)}", body, {"Content-Type": JSON}
                )
                response = connection.getresponse()
                response.read()
                if response.status != 204:
                    raise RuntimeError(f"{server.name}: preload answered {response.status}")
    finally:
        connection.close()


def preload_webdis(server: peers.Webdis, sizes: tuple[int, ...]) -> None:
    """GET hit's keys, set in Webdis's Redis to the JSON text dache would store."""
    for size in sizes:
        keys = [hit_key(size, i) for i in range(KEYS)]
        peers.preload_redis(server.redis, keys, json.dumps(value_of(size)).encode())


ETCD_PRELOADERS = 8  # concurrent puts: etcd commits them together, one fsync for several


def preload_etcd(server: Server, sizes: tuple[int, ...]) -> None:
    with ThreadPoolExecutor(max_workers=ETCD_PRELOADERS) as pool:
        parts = [
            pool.submit(_preload_etcd_part, server, size, range(part, KEYS, ETCD_PRELOADERS))
            for size in sizes
            for part in range(ETCD_PRELOADERS)
        ]
        for done in parts:
            done.result()


def _preload_etcd_part(server: Server, size: int, indexes: range) -> None:
    from bench.scenarios import etcd_put_body

    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        for i in indexes:
            body = etcd_put_body(hit_key(size, i), size).encode()
            connection.request("POST", "/v3/kv/put", body, {"Content-Type": JSON})
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"etcd: preload answered {response.status}")
    finally:
        connection.close()


JSON = "application/json"
RESP_CONNECTIONS = 64  # redis-benchmark's clients, as the wrk scenarios' 64
# Redis durability level -> the redis-benchmark tests run against it (GET does not depend on it)
RESP_TESTS = {"no": "get,set", "always": "set"}


def log(message: str) -> None:
    sys.stdout.write(f"[bench {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stdout.flush()


def measure_redis(workdir: str, entries: int) -> peers.RedisStartup:
    log(f"start-up: Redis AOF, {entries} entries")
    try:
        return peers.measure_redis_startup(workdir, entries)
    except Exception as e:  # noqa: BLE001 - reported in RESULTS.md, the rest still written
        return peers.RedisStartup(entries, error=str(e)[-500:])


def kinds_of(text: str) -> set[str]:
    """--only's kinds: a comma followed by a space is inside a name ("GET hit, 2 workers")."""
    return {kind.strip() for kind in re.split(r",(?! )", text) if kind.strip()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="dache benchmarks (see bench/RESULTS.md)")
    parser.add_argument("--quick", action="store_true", help="a smoke run, under a minute")
    parser.add_argument(
        "--out", default=HERE, help="directory for RESULTS.md and results.png (default: bench/)"
    )
    parser.add_argument(
        "--no-startup", action="store_true", help="skip the start-up load measurement"
    )
    parser.add_argument(
        "--only",
        help="comma-separated scenario kinds, e.g. 'GET hit,webdis GET, 2 threads' (a comma "
        "and a space belong to a name)",
    )
    parser.add_argument("--rounds", type=int, help="override the mode's rounds")
    parser.add_argument("--seconds", type=int, help="override the mode's seconds per run")
    parser.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="profile GET and SET with py-spy (default: in full mode)",
    )
    args = parser.parse_args(argv)
    mode = QUICK if args.quick else FULL
    if args.rounds or args.seconds:
        mode = dataclasses.replace(
            mode, rounds=args.rounds or mode.rounds, seconds=args.seconds or mode.seconds
        )
    command = "make bench" + (" QUICK=1" if args.quick else "")

    began = time.monotonic()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="dache-bench-") as workdir:
        bench = Bench(mode, workdir, only=kinds_of(args.only) if args.only else None)
        try:
            startup.prepare(workdir)
            bench.run()
            others_share = bench.meter.share()
            rss = bench.rss()
            profile = args.profile if args.profile is not None else mode.name == "full"
            profiles = bench.profile() if profile else {}
        finally:
            bench.stop()
        startups = [] if args.no_startup else startup.measure_all(workdir, mode.startup_entries)
        startup.cleanup()
        redis_startup = None if args.no_startup else measure_redis(workdir, mode.startup_entries)
    load_after = os.getloadavg()

    runs = report.Runs(bench.samples)
    context = report.Context(
        command=command,
        mode=mode.name,
        rounds=mode.rounds,
        seconds=mode.seconds,
        warmup=mode.warmup,
        load_before=load_before,
        load_after=load_after,
        others_share=others_share,
        elapsed=time.monotonic() - began,
        machine=f"{os.cpu_count()} cores, Python {platform.python_version()}, {platform.machine()}",
    )
    scenarios = bench.scenarios()
    text = report.markdown(
        context, scenarios, runs, bench.missing, startups, rss, profiles, bench.resp, redis_startup
    )
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "RESULTS.md"), "w") as f:
        f.write(text)
    report.chart(scenarios, runs.medians, os.path.join(args.out, "results.png"))
    sys.stdout.write("\n" + report.targets_text(runs, startups) + "\n")
    log(f"wrote {os.path.join(args.out, 'RESULTS.md')} in {time.monotonic() - began:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
