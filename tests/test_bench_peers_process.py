"""
The peers' harness run for real, at a smoke's size (no figure asserted, only
that each piece measures what it says): Webdis + Redis started from the
bench's config files, preloaded and loaded by wrk; redis-benchmark; Redis's
AOF load; and `python -m bench.run` with the peer scenarios, as `make bench`
runs it, writing the peers' tables and the chart.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from bench import peers
from bench.load import run_wrk
from bench.neighbours import tree_seconds
from bench.run import kinds_of, preload_webdis
from bench.scenarios import KEYS, value_of, write_request_file
from tests import debian

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Debian package -> the program it brings (bench/ensure-tools.sh installs the same)
PACKAGES = {
    "webdis": "webdis",
    "redis-server": "redis-server",
    "redis-tools": "redis-benchmark",
    "wrk": "wrk",
    "util-linux": "taskset",
}


@pytest.fixture(scope="module", autouse=True)
def peer_tools():
    for package, program in PACKAGES.items():
        debian.ensure(package, lambda program=program: shutil.which(program) is not None)


@pytest.fixture
def webdis(tmp_path):
    started = []

    def start(fsync: str, threads: int = 1) -> peers.Webdis:
        server = peers.Webdis(f"webdis-{fsync}", str(tmp_path / fsync), fsync, threads)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()
        assert server.proc.poll() is not None and server.redis.proc.poll() is not None


def webdis_get(server: peers.Webdis, key: str):
    status, body = server.request("GET", f"/GET/{key}")
    reply = json.loads(body)
    # the whole answer in the message: once, under a loaded full suite, it had no "GET"
    assert status == 200 and "GET" in reply, (status, body)
    return reply["GET"]


def test_webdis_serves_the_preloaded_values_and_takes_the_bench_sets(webdis, tmp_path):
    server = webdis("always")
    client = server.redis.client()
    try:
        # the durability level asked for is the one Redis runs with
        assert client.config_get("appendfsync") == {"appendfsync": "always"}
        assert client.config_get("appendonly") == {"appendonly": "yes"}
    finally:
        client.close()

    preload_webdis(server, (100,))
    stored = json.dumps(value_of(100))  # the JSON text dache stores and serves
    assert webdis_get(server, "h100-0") == stored
    assert webdis_get(server, f"h100-{KEYS - 1}") == stored

    sets = write_request_file(str(tmp_path), "webdis SET always", 100)
    sample = run_wrk(server.url, sets, 4, 1, server.cpu_pids)
    assert sample.requests > 0 and sample.non2xx == 0
    assert sample.cpu_us is not None  # Webdis's and Redis's CPU, read from /proc
    assert webdis_get(server, "s100-0") == stored  # PUT /SET/<key>: the body is the value

    gets = write_request_file(str(tmp_path), "webdis GET", 100)
    unpinned = run_wrk(server.url, gets, 4, 1, server.cpu_pids, threads=2, cpu=None)
    assert unpinned.requests > 0 and unpinned.non2xx == 0
    assert unpinned.load_share is not None and 0 < unpinned.load_share <= 1


def test_redis_without_an_aof_keeps_none(webdis):
    server = webdis("no")
    client = server.redis.client()
    try:
        assert client.config_get("appendonly") == {"appendonly": "no"}
        assert client.config_get("save") == {"save": ""}  # no RDB snapshots either
    finally:
        client.close()


def test_redis_benchmark_reports_each_test_it_ran(webdis):
    server = webdis("no")
    result = peers.redis_benchmark(server.redis.redis_port, 8, 100, 2_000, "get,set")
    assert set(result) == {"GET", "SET"}
    assert all(sample.rps > 0 and sample.p99_ms >= sample.p50_ms for sample in result.values())


def test_redis_loads_the_aof_it_was_filled_through(tmp_path):
    result = peers.measure_redis_startup(str(tmp_path), 5_000)
    assert result.error is None  # it loaded every key
    assert result.load_seconds is not None  # Redis's own "DB loaded from append only file"
    assert result.rewritten_load_seconds is not None  # and again after BGREWRITEAOF
    assert result.aof_bytes and result.aof_bytes > 5_000 * 100
    assert result.rss_full and result.rss_empty


def test_the_bench_counts_its_exited_children_as_its_own_cpu():
    before = tree_seconds([os.getpid()])
    burn = "import time\nwhile time.process_time() < 0.4: pass"
    subprocess.run([sys.executable, "-c", burn], check=True, timeout=60)
    assert tree_seconds([os.getpid()]) - before >= 0.3


def test_only_keeps_the_kinds_whose_names_hold_a_comma():
    assert kinds_of("GET hit,webdis GET, 2 threads,SET disk") == {
        "GET hit",
        "webdis GET, 2 threads",
        "SET disk",
    }


def test_bench_run_writes_the_peers_tables_and_chart(tmp_path):
    """`make bench`'s entry point with a peer of each kind, at a smoke's size."""
    kinds = "GET hit,webdis GET,SET disk,webdis SET always,GET hit, 2 workers,webdis GET, 2 threads"
    out = tmp_path / "out"
    command = [sys.executable, "-m", "bench.run", "--quick", "--only", kinds]
    command += ["--no-startup", "--no-profile", "--out", str(out)]
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = (out / "RESULTS.md").read_text()
    assert "## Against the peers: Webdis + Redis" in results
    rows = [line for line in results.splitlines() if line.startswith("| GET | served")]
    assert len(rows) == 1 and "×** |" in rows[0]  # a ratio, dache over Webdis
    assert any(line.startswith("| SET | fsync before the answer") for line in results.splitlines())
    assert any(line.startswith("| GET | whole machine") for line in results.splitlines())
    assert "### RESP's limit: redis-benchmark" in results
    assert "| GET | appendonly no | 100 B |" in results
    assert "| SET | appendfsync always | 100 B |" in results
    assert "of the machine's CPU time during the rounds" in results
    assert (out / "results.png").stat().st_size > 0
