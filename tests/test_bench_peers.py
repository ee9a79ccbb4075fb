"""
The benchmark's peer pieces that could rot without a full `make bench`: the
config files written for Redis and Webdis (loopback only, the durability level
asked for), redis-benchmark's output parsed, and the dache / peer ratios.
"""

from __future__ import annotations

import json

from bench.load import Sample
from bench.peers import parse_benchmark_csv, redis_conf, webdis_conf
from bench.report import Runs, peer_rows, peers_markdown
from bench.run import KIND_TARGETS
from bench.scenarios import KINDS, PEER_KINDS, WHOLE_MACHINE_KINDS, Scenario, request_lines


def conf_lines(text: str) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in text.splitlines())


def test_redis_listens_on_loopback_only_and_keeps_its_data_in_the_temp_dir():
    conf = conf_lines(redis_conf(6400, "/tmp/bench-redis", "always"))
    assert conf["bind"] == "127.0.0.1"
    assert conf["port"] == "6400"
    assert conf["protected-mode"] == "yes"
    assert conf["dir"] == "/tmp/bench-redis"
    assert conf["daemonize"] == "no"
    assert conf["save"] == '""'  # no RDB snapshots beside the AOF
    assert "unixsocket" not in conf


def test_each_redis_durability_level_is_the_setting_it_names():
    assert conf_lines(redis_conf(1, "/d", "no"))["appendonly"] == "no"
    for fsync in ("everysec", "always"):
        conf = conf_lines(redis_conf(1, "/d", fsync))
        assert (conf["appendonly"], conf["appendfsync"]) == ("yes", fsync)
    extra = conf_lines(redis_conf(1, "/d", "everysec", {"auto-aof-rewrite-percentage": "0"}))
    assert extra["auto-aof-rewrite-percentage"] == "0"


def test_webdis_listens_on_loopback_in_the_foreground_with_the_threads_asked_for():
    conf = json.loads(json.dumps(webdis_conf(7400, 6400, 1, "/tmp/w.log")))
    assert (conf["http_host"], conf["http_port"]) == ("127.0.0.1", 7400)
    assert (conf["redis_host"], conf["redis_port"]) == ("127.0.0.1", 6400)
    assert conf["threads"] == 1
    assert conf["daemonize"] is False and conf["websockets"] is False
    assert conf["logfile"] == "/tmp/w.log"
    assert webdis_conf(7400, 6400, 2, "/tmp/w.log")["threads"] == 2


def test_redis_benchmark_csv_is_read_by_its_header():
    text = (
        '"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms",'
        '"p99_latency_ms","max_latency_ms"\n'
        '"SET","35087.72","0.732","0.112","0.623","1.535","2.167","12.303"\n'
        '"GET","43478.26","0.725","0.248","0.647","1.079","4.071","4.279"\n'
    )
    parsed = parse_benchmark_csv(text)
    assert set(parsed) == {"SET", "GET"}
    assert (parsed["GET"].rps, parsed["GET"].p50_ms, parsed["GET"].p99_ms) == (
        43478.26,
        0.647,
        4.071,
    )


def test_every_peer_kind_has_a_target_and_webdis_requests():
    for kind in (*PEER_KINDS, *WHOLE_MACHINE_KINDS):
        assert kind in KINDS and kind in KIND_TARGETS
    assert request_lines("webdis GET", 100)[0] == ("GET", "/GET/h100-0", "")
    method, path, body = request_lines("webdis SET always", 100)[0]
    assert (method, path) == ("PUT", "/SET/s100-0")
    assert len(body) == 100 and json.loads(body) == "x" * 98  # the JSON text dache stores


def sample(rps, p50=1.0, p99=2.0, cpu=None, share=None):
    return Sample(rps, p50, p99, 1, 0, 0, cpu_us=cpu, load_share=share)


def test_peer_ratios_are_dache_over_the_peer_within_each_round():
    # the second round ran on a machine twice as fast, for both sides
    runs = Runs(
        {
            ("SET disk", 64, 100): [sample(4_000, cpu=100), sample(8_000, cpu=100)],
            ("webdis SET always", 64, 100): [sample(5_000, cpu=50), sample(10_000, cpu=50)],
            ("GET hit, 2 workers", 64, 100): [sample(12_000, share=0.2)],
            ("webdis GET, 2 threads", 64, 100): [sample(10_000, share=0.3)],
            ("SET memory", 64, 100): [sample(6_000)],  # no peer measured
        }
    )
    scenarios = [
        Scenario("SET disk", "dache-disk", 64, 100),
        Scenario("webdis SET always", "webdis-always", 64, 100),
        Scenario("SET memory", "dache-memory", 64, 100),
        Scenario("GET hit, 2 workers", "dache-2-workers", 64, 100),
        Scenario("webdis GET, 2 threads", "webdis-2-threads", 64, 100),
    ]
    rows = peer_rows(scenarios, runs)
    assert [(r.operation, r.ratio, r.cpu_ratio) for r in rows] == [
        ("SET", 0.8, 0.5),
        ("GET", 1.2, None),
    ]
    table = "\n".join(peers_markdown(scenarios, runs, {}, [], None))
    assert "| **0.80×** | 0.50× |" in table
    assert "| **1.20×** |" in table and "20% / 30%" in table  # wrk's share, both runs
    assert "dache is ahead in 1 of 2 pairs: GET whole machine: dache WORKERS=2" in table
    assert "Behind in 1: from SET fsync before the answer, c64 100 B (0.80×)" in table
