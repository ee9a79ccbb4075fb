"""
/health, /health/live and /health/ready over the in-memory node (no sockets),
with a task.Clock: the health+json shape, the probe cache, and the engine
state machine driven by a test engine that can be told to fail.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

import dache
from dache.engines import EngineHealth
from dache.testing import BASE, MemoryNode
from dache.web.health import api_version
from tests.switchable_engine import SwitchableEngine


def done(d: Deferred[Any]) -> Any:
    """The result of a Deferred that must already have fired."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "no answer yet"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def has_result(d: Deferred[Any]) -> bool:
    results: list[Any] = []
    d.addBoth(lambda r: results.append(r) or r)
    return bool(results)


def call(node: MemoryNode, method: str, path: str, **kwargs: Any) -> tuple[int, Any, Any]:
    """Make a request; (status, headers, parsed JSON body or None)."""
    response = done(node.http.request(method, BASE + path, **kwargs))
    body = done(response.content())
    return response.code, response.headers, json.loads(body) if body else None


def pending(node: MemoryNode, path: str) -> Deferred[Any]:
    return node.http.get(BASE + path)


def answer(node: MemoryNode, d: Deferred[Any]) -> tuple[int, Any]:
    node.http.flush()
    response = done(d)
    return response.code, json.loads(done(response.content()))


@pytest.fixture
def engine() -> SwitchableEngine:
    return SwitchableEngine()


@pytest.fixture
def node(engine: SwitchableEngine) -> MemoryNode:
    return MemoryNode(engine=engine)


def set_key(node: MemoryNode, key: str, value: Any) -> int:
    return call(node, "POST", f"/dache/{key}", json={"value": value})[0]


def test_health_passes_with_its_checks(node: MemoryNode) -> None:
    assert set_key(node, "a", 1) == 204
    assert set_key(node, "b", [1, 2]) == 204
    node.clock.advance(5)

    status, headers, body = call(node, "GET", "/health")

    assert status == 200
    assert headers.getRawHeaders("content-type") == ["application/health+json"]
    assert headers.getRawHeaders("cache-control") == ["no-store"]
    assert body["status"] == "pass"
    assert body["releaseId"] == dache.__version__
    assert body["version"] == api_version(dache.__version__)
    assert "output" not in body
    checks = body["checks"]
    (engine,) = checks["engine:responseTime"]
    assert engine["componentId"] == "switchable"
    assert engine["status"] == "pass"
    assert engine["observedUnit"] == "ms"
    assert engine["observedValue"] >= 0
    assert checks["engine:writes"][0]["status"] == "pass"
    assert checks["cache:entries"][0]["observedValue"] == 2
    assert checks["cache:bytes"][0]["observedValue"] == node.cache.bytes > 0
    assert checks["uptime"][0]["observedValue"] == 5.0
    assert checks["uptime"][0]["observedUnit"] == "s"


def test_live_and_ready_pass(node: MemoryNode) -> None:
    assert call(node, "GET", "/health/live")[::2] == (200, {"status": "pass"})
    assert call(node, "GET", "/health/ready")[::2] == (200, {"status": "pass"})
    status, headers, body = call(node, "HEAD", "/health/ready")
    assert (status, body) == (200, None)
    assert headers.getRawHeaders("content-type") == ["application/health+json"]


def test_engine_response_time_is_measured(node: MemoryNode, engine: SwitchableEngine) -> None:
    engine.hang = True
    d = pending(node, "/health")
    node.clock.advance(0.25)
    engine.pending[0].callback(EngineHealth(ok=True))
    status, body = answer(node, d)
    assert (status, body["status"]) == (200, "pass")
    (check,) = body["checks"]["engine:responseTime"]
    assert (check["observedValue"], check["status"]) == (250.0, "pass")


def test_a_probe_storm_reaches_the_engine_about_once_a_second(
    node: MemoryNode, engine: SwitchableEngine
) -> None:
    for _ in range(50):
        assert call(node, "GET", "/health")[0] == 200
        assert call(node, "GET", "/health/ready")[0] == 200
    assert engine.checks == 1
    node.clock.advance(0.5)
    for _ in range(50):
        assert call(node, "GET", "/health")[0] == 200
    assert engine.checks == 1
    node.clock.advance(0.6)
    for _ in range(50):
        assert call(node, "GET", "/health")[0] == 200
    assert engine.checks == 2
    # /health/live never asks the engine.
    node.clock.advance(5)
    for _ in range(10):
        assert call(node, "GET", "/health/live")[0] == 200
    assert engine.checks == 2


def test_probes_arriving_during_a_check_share_it(
    node: MemoryNode, engine: SwitchableEngine
) -> None:
    engine.hang = True
    waiting = [pending(node, "/health") for _ in range(3)] + [pending(node, "/health/ready")]
    assert engine.checks == 1
    node.clock.advance(1)  # the health timeout: every waiter gets the same answer
    answers = [answer(node, d) for d in waiting]
    assert [status for status, _ in answers] == [200, 200, 200, 503]
    assert engine.checks == 1


def test_engine_down_warns_serves_reads_and_comes_back(
    node: MemoryNode, engine: SwitchableEngine
) -> None:
    assert set_key(node, "kept", "value") == 204
    assert call(node, "GET", "/health")[2]["status"] == "pass"

    engine.fail("could not connect to the database: connection refused")
    status, _, body = call(node, "POST", "/dache/new", json={"value": 1})
    assert status == 503

    status, _, body = call(node, "GET", "/health")  # still cached: the write failure counts
    assert status == 200
    assert body["status"] == "warn"
    assert "connection refused" in body["output"]
    writes = body["checks"]["engine:writes"][0]
    assert writes["status"] == "warn"
    assert "connection refused" in writes["output"]
    assert call(node, "GET", "/health/ready")[::2] == (
        503,
        {"status": "fail", "output": body["output"]},
    )
    assert call(node, "GET", "/health/live")[0] == 200
    assert call(node, "GET", "/dache/kept")[::2] == (200, {"key": "kept", "value": "value"})

    node.clock.advance(1.1)  # a new round trip: the check fails too
    status, _, body = call(node, "GET", "/health")
    assert (status, body["status"]) == (200, "warn")
    assert body["checks"]["engine:responseTime"][0]["status"] == "warn"

    engine.recover()
    node.clock.advance(1.1)
    status, _, body = call(node, "GET", "/health")
    assert (status, body["status"]) == (200, "pass")
    assert call(node, "GET", "/health/ready")[0] == 200
    assert set_key(node, "new", 2) == 204


def test_a_failing_check_alone_makes_the_node_unready(
    node: MemoryNode, engine: SwitchableEngine
) -> None:
    engine.fail("disk full")
    status, _, body = call(node, "GET", "/health")
    assert (status, body["status"]) == (200, "warn")
    check = body["checks"]["engine:responseTime"][0]
    assert (check["status"], check["output"]) == ("warn", "disk full")
    assert call(node, "GET", "/health/ready")[0] == 503


def test_a_check_that_does_not_answer_times_out(node: MemoryNode, engine: SwitchableEngine) -> None:
    engine.hang = True
    d = pending(node, "/health")
    node.http.flush()
    assert not has_result(d)
    node.clock.advance(1)
    status, body = answer(node, d)
    assert (status, body["status"]) == (200, "warn")
    assert body["checks"]["engine:responseTime"][0]["output"] == (
        "no answer to the health check within 1s"
    )


def test_an_unexpected_check_error_shows_no_detail(
    node: MemoryNode, engine: SwitchableEngine
) -> None:
    engine.crash = RuntimeError("password=hunter2 rejected")
    events: list[dict[str, Any]] = []
    node.api.monitor.log = Logger(observer=events.append)
    status, _, body = call(node, "GET", "/health")
    assert (status, body["status"]) == (200, "warn")
    assert "hunter2" not in json.dumps(body)
    assert "see the server log" in body["checks"]["engine:responseTime"][0]["output"]
    assert any(e.get("log_failure") is not None for e in events)


def test_an_outage_is_logged_once_when_it_starts_and_once_when_it_ends(
    node: MemoryNode, engine: SwitchableEngine
) -> None:
    events: list[dict[str, Any]] = []
    node.api.monitor.log = Logger(observer=events.append)
    engine.fail("connection refused")
    for i in range(10):
        assert set_key(node, f"k{i}", i) == 503
        assert call(node, "GET", "/health")[0] == 200
        node.clock.advance(1.2)
    engine.recover()
    assert set_key(node, "k", 1) == 204
    assert set_key(node, "k", 2) == 204

    assert [(e["log_level"].name, e["log_format"].split(" {")[0]) for e in events] == [
        ("warn", "durability engine"),
        ("info", "durability engine"),
    ]
    down, up = events
    assert (down["engine"], down["error"]) == ("switchable", "connection refused")
    assert up["outage_seconds"] == pytest.approx(12.0)


def test_a_check_that_began_before_a_failed_write_does_not_hide_it(
    node: MemoryNode, engine: SwitchableEngine
) -> None:
    engine.hang = True
    d = pending(node, "/health")
    node.clock.advance(0.5)
    engine.fail("connection reset")
    assert set_key(node, "k", 1) == 503
    node.clock.advance(0.3)
    engine.pending[0].callback(EngineHealth(ok=True))  # the older news: it passed
    status, body = answer(node, d)
    assert (status, body["status"]) == (200, "warn")
    assert body["checks"]["engine:responseTime"][0]["status"] == "pass"
    assert body["checks"]["engine:writes"][0]["output"] == "connection reset"
    # A check that begins after the failure decides.
    engine.recover()
    node.clock.advance(1)
    assert call(node, "GET", "/health")[2]["status"] == "pass"


def test_health_fails_while_shutting_down(node: MemoryNode) -> None:
    done(node.committer.drain())
    status, _, body = call(node, "GET", "/health")
    assert (status, body["status"], body["output"]) == (503, "fail", "dache is shutting down")
    assert call(node, "GET", "/health/ready")[0] == 503
    assert call(node, "GET", "/health/live")[0] == 200


@pytest.mark.parametrize("release, version", [("0.4.0", "0.4"), ("1.2.3", "1"), ("2.0.0rc1", "2")])
def test_api_version(release: str, version: str) -> None:
    assert api_version(release) == version
