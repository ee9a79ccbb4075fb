"""
Health against a real PostgreSQL (the suite's own cluster, stopped and
started): /health goes pass -> warn -> pass and /health/ready 200 -> 503 -> 200
while reads keep being served, and the outage is logged once when it starts
and once when it ends. `twistd -n dache` subprocess; polls have deadlines.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any


def wait_until(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def health(node: Any) -> tuple[int, dict[str, Any]]:
    status, headers, body = node.request("GET", "/health")
    assert headers["Content-Type"] == "application/health+json"
    return status, json.loads(body)


def ready(node: Any) -> int:
    return node.request("GET", "/health/ready")[0]


def test_health_follows_postgres_down_and_up(dache_process, own_postgres, own_pg) -> None:
    node = dache_process(env={**own_pg.env, "LOG_FORMAT": "json"})
    assert node.set("kept", "value") == 204
    status, body = health(node)
    assert (status, body["status"]) == (200, "pass")
    assert body["checks"]["engine:responseTime"][0]["componentId"] == "postgres"
    assert ready(node) == 200

    own_postgres.stop("immediate")
    wait_until(lambda: health(node)[1]["status"] == "warn")
    status, body = health(node)
    assert status == 200  # reads are still served
    assert body["checks"]["engine:responseTime"][0]["status"] == "warn"
    assert body["checks"]["engine:responseTime"][0]["output"]
    if own_postgres.password:
        assert own_postgres.password not in json.dumps(body)
    assert ready(node) == 503
    assert node.get("kept") == (200, {"key": "kept", "value": "value"})
    for i in range(5):
        assert node.set(f"during{i}", i) == 503

    own_postgres.start()
    wait_until(lambda: health(node)[1]["status"] == "pass")
    wait_until(lambda: ready(node) == 200)
    assert node.set("after", 1) == 204

    records = [json.loads(line) for line in list(node.lines)]
    outage = [r for r in records if r.get("namespace") == "dache.web.health.HealthMonitor"]
    assert [r["level"] for r in outage] == ["warn", "info"], outage
    assert outage[0]["engine"] == "postgres"
    assert outage[1]["outage_seconds"] > 0
