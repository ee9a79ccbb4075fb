"""
The peers a user weighing an HTTP/JSON cache would try instead of dache:
Redis behind Webdis (Redis's HTTP/JSON front end), and Redis itself over RESP
(redis-benchmark: the protocol's limit, not a like-for-like peer).

Both run from the Debian packages (bench/ensure-tools.sh) with config files of
our own in a temp dir, written here from scratch rather than from the packaged
ones: Redis compiled-in defaults bind every interface and Webdis's default
http_host is 0.0.0.0, so every file names 127.0.0.1 and a free port, keeps its
data in the temp dir, and turns off what the bench does not use (RDB
snapshots, Webdis's WebSockets and daemonizing).

Durability levels, each against its dache counterpart:

    Redis appendonly no            dache DURABILITY_ENGINE=memory
    Redis appendfsync everysec     dache disk, DISK_FSYNC=everysec
    Redis appendfsync always       dache disk, DISK_FSYNC=always (the default)
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass

from bench.servers import LOAD_CPU, SERVER_CPU, Server, free_port, pinned

# durability level -> Redis's settings for it
FSYNC_LEVELS = {
    "no": {"appendonly": "no"},
    "everysec": {"appendonly": "yes", "appendfsync": "everysec"},
    "always": {"appendonly": "yes", "appendfsync": "always"},
}
READY = "Ready to accept connections"
AOF_LOADED = re.compile(r"DB loaded from append only file: ([\d.]+) seconds")


def redis_conf(port: int, data_dir: str, fsync: str, extra: dict[str, str] | None = None) -> str:
    """redis.conf for a bench Redis: loopback only, data in data_dir, no RDB snapshots."""
    settings = {
        "bind": "127.0.0.1",
        "protected-mode": "yes",
        "port": str(port),
        "daemonize": "no",
        "supervised": "no",
        "dir": data_dir,
        "logfile": '""',  # stdout, read by the harness
        "save": '""',  # no RDB snapshots: durability is the AOF's alone, as set below
        **FSYNC_LEVELS[fsync],
        **(extra or {}),
    }
    return "".join(f"{name} {value}\n" for name, value in settings.items())


def webdis_conf(http_port: int, redis_port: int, threads: int, log_path: str) -> dict:
    """webdis.json: loopback only, in the foreground, `threads` worker threads."""
    return {
        "redis_host": "127.0.0.1",
        "redis_port": redis_port,
        "redis_auth": None,
        "http_host": "127.0.0.1",
        "http_port": http_port,
        "threads": threads,
        "pool_size": 20,  # Redis connections per thread (Webdis's default)
        "daemonize": False,
        "websockets": False,
        "database": 0,
        "acl": [{"disabled": ["DEBUG"]}],
        "verbosity": 1,  # errors only: a log line per request would cost throughput
        "logfile": log_path,
    }


class Redis(Server):
    """redis-server on a loopback port, its config and data in `directory`."""

    def __init__(
        self,
        name: str,
        directory: str,
        fsync: str,
        cpu: int | None = SERVER_CPU,
        extra: dict[str, str] | None = None,
    ):
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.redis_port = free_port()
        self.conf_path = os.path.join(directory, "redis.conf")
        with open(self.conf_path, "w") as f:
            f.write(redis_conf(self.redis_port, directory, fsync, extra))
        command = [shutil.which("redis-server") or "redis-server", self.conf_path]
        super().__init__(name, command, cpu=cpu)

    def wait_ready(self, timeout: float) -> None:
        self.port = self.redis_port
        deadline = time.monotonic() + timeout
        while not any(READY in line for line in self.lines):
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited before listening:\n{self.output()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not listen in time:\n{self.output()}")
            time.sleep(0.02)

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.redis_port, socket_timeout=30)

    def aof_load_seconds(self) -> float | None:
        """Redis's own "DB loaded from append only file" figure, if it loaded one."""
        for line in self.lines:
            match = AOF_LOADED.search(line)
            if match:
                return float(match.group(1))
        return None


class Webdis(Server):
    """Webdis in front of its own Redis; both pinned to the server core (or both unpinned)."""

    def __init__(self, name: str, directory: str, fsync: str, threads: int = 1, pinned_cpu=True):
        cpu = SERVER_CPU if pinned_cpu else None
        self.redis = Redis(f"{name}-redis", os.path.join(directory, "redis"), fsync, cpu=cpu)
        self.http_port = free_port()
        self.conf_path = os.path.join(directory, "webdis.json")
        conf = webdis_conf(
            self.http_port, self.redis.redis_port, threads, os.path.join(directory, "webdis.log")
        )
        with open(self.conf_path, "w") as f:
            json.dump(conf, f, indent=2)
        super().__init__(name, [shutil.which("webdis") or "webdis", self.conf_path], cpu=cpu)

    def start(self, timeout: float = 60.0) -> Webdis:
        self.redis.start(timeout)
        super().start(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        self.port = self.http_port
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited before listening:\n{self.output()}")
            try:
                status, body = self.request("GET", "/PING", timeout=1)
                if status == 200 and b"PONG" in body:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not answer in time:\n{self.output()}")
            time.sleep(0.05)

    @property
    def cpu_pids(self) -> tuple[int, ...]:
        return (self.pid, self.redis.pid)

    def rss_bytes(self) -> int:
        return super().rss_bytes() + self.redis.rss_bytes()

    def stop(self, timeout: float = 30.0) -> None:
        super().stop(timeout)
        self.redis.stop(timeout)


def preload_redis(redis: Redis, keys: list[str], value: bytes, batch: int = 10_000) -> None:
    """SET every key to value, pipelined, in batches."""
    client = redis.client()
    try:
        for start in range(0, len(keys), batch):
            pipe = client.pipeline(transaction=False)
            for key in keys[start : start + batch]:
                pipe.set(key, value)
            pipe.execute()
    finally:
        client.close()


# -- redis-benchmark: RESP's limit on the same core budget


@dataclass
class RespSample:
    rps: float
    p50_ms: float
    p99_ms: float


def redis_benchmark(
    port: int, connections: int, value_bytes: int, requests: int, tests: str = "get,set"
) -> dict[str, RespSample]:
    """redis-benchmark pinned to the load core, one thread, no pipelining: test -> figures."""
    command = pinned(
        LOAD_CPU,
        [
            shutil.which("redis-benchmark") or "redis-benchmark",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-c",
            str(connections),
            "-n",
            str(requests),
            "-d",
            str(value_bytes),
            "-r",
            "1000",  # keys cycle through 1000, as the wrk scenarios' do
            "-t",
            tests,
            "--csv",
        ],
    )
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    return parse_benchmark_csv(done.stdout)


def parse_benchmark_csv(text: str) -> dict[str, RespSample]:
    """redis-benchmark --csv (7.x: a header line, then one row per test)."""
    rows = csv.DictReader(io.StringIO(text))
    return {
        row["test"]: RespSample(
            rps=float(row["rps"]),
            p50_ms=float(row["p50_latency_ms"]),
            p99_ms=float(row["p99_latency_ms"]),
        )
        for row in rows
    }


# -- memory per entry and AOF load time, against dache's start-up figures


@dataclass
class RedisStartup:
    """Redis with N entries (bench.fill's keys and 100 B values), loaded from its AOF."""

    entries: int
    fill_seconds: float | None = None
    aof_bytes: int | None = None
    load_seconds: float | None = None  # Redis's own figure, AOF of SET commands
    listening_seconds: float | None = None  # process start to ready
    rss_empty: int | None = None
    rss_full: int | None = None
    rewritten_load_seconds: float | None = None  # after BGREWRITEAOF (an RDB preamble)
    error: str | None = None

    @property
    def bytes_per_entry(self) -> float | None:
        if self.rss_full is None or self.rss_empty is None:
            return None
        return (self.rss_full - self.rss_empty) / self.entries


def _directory_bytes(path: str) -> int:
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(path)
        for name in names
    )


def _settled_rss(server: Server) -> int:
    time.sleep(0.5)  # as bench.startup does for dache
    return server.rss_bytes()


def _wait_rewrite(redis: Redis, timeout: float = 300) -> None:
    client = redis.client()
    try:
        client.bgrewriteaof()
        deadline = time.monotonic() + timeout
        while True:
            info = client.info("persistence")
            if not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("BGREWRITEAOF did not finish in time")
            time.sleep(0.1)
    finally:
        client.close()


def measure_redis_startup(workdir: str, entries: int) -> RedisStartup:
    """
    Fill a Redis (appendfsync everysec; automatic AOF rewrites off, so the AOF
    is the SET commands, as dache's log is its writes) with `entries`, stop it,
    start it again on the AOF: Redis's load time and RSS against the empty
    server's. Then BGREWRITEAOF (Redis's compaction) and the load time again.
    """
    from bench.fill import key_of, value_json

    result = RedisStartup(entries)
    directory = os.path.join(workdir, "redis-startup")
    extra = {"auto-aof-rewrite-percentage": "0"}
    redis = Redis("redis-startup", directory, "everysec", extra=extra).start()
    try:
        result.rss_empty = _settled_rss(redis)
        began = time.monotonic()
        preload_redis(redis, [key_of(i) for i in range(entries)], value_json())
        result.fill_seconds = time.monotonic() - began
    finally:
        redis.stop()
    result.aof_bytes = _directory_bytes(os.path.join(directory, "appendonlydir"))

    redis = Redis("redis-startup", directory, "everysec", extra=extra)
    began = time.monotonic()
    redis.start(timeout=300)
    try:
        result.listening_seconds = time.monotonic() - began
        result.load_seconds = redis.aof_load_seconds()
        result.rss_full = _settled_rss(redis)
        client = redis.client()
        try:
            if client.dbsize() != entries:
                result.error = f"Redis loaded {client.dbsize()} keys, expected {entries}"
        finally:
            client.close()
        _wait_rewrite(redis)
    finally:
        redis.stop()

    redis = Redis("redis-startup", directory, "everysec", extra=extra).start(timeout=300)
    try:
        result.rewritten_load_seconds = redis.aof_load_seconds()
    finally:
        redis.stop()
    return result
