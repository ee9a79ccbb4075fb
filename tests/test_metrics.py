"""
GET /metrics: parsed with prometheus_client's own parser. Request counters are
checked end to end against `twistd -n dache` (they are counted by the Site,
which the in-memory node does not use); the rest over the in-memory node.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import dache
from dache.testing import BASE, MemoryNode
from dache.web.metrics import Histogram, Metrics
from tests.switchable_engine import SwitchableEngine
from tests.test_health import call, done

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


# -- end to end: requests counted by route, method and status


def scrape(process: Any) -> Samples:
    status, headers, body = process.request("GET", "/metrics")
    assert status == 200
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    return parse(body.decode("utf-8"))


def test_request_counters_move_by_exactly_the_requests_made(dache_process: Any) -> None:
    process = dache_process()
    before = scrape(process)

    assert process.set("a", 1) == 204
    assert process.set("b", {"x": [1, 2]}) == 204
    assert process.get("a")[0] == 200
    assert process.get("a")[0] == 200
    assert process.get("missing")[0] == 404
    assert process.request("POST", "/dache/a", b"not json")[0] == 400
    assert process.delete("b") == 204
    assert process.request("HEAD", "/dache/a")[0] == 200
    assert process.request("GET", "/nowhere")[0] == 404
    assert process.request("BREW", "/dache/a")[0] == 405
    assert process.request("GET", "/health")[0] == 200

    after = scrape(process)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    requests = "dache_http_requests_total"
    key = "/dache/{key}"
    assert moved(requests, route=key, method="POST", status="204") == 2
    assert moved(requests, route=key, method="POST", status="400") == 1
    assert moved(requests, route=key, method="GET", status="200") == 2
    assert moved(requests, route=key, method="GET", status="404") == 1
    assert moved(requests, route=key, method="DELETE", status="204") == 1
    assert moved(requests, route=key, method="HEAD", status="200") == 1
    assert moved(requests, route="other", method="GET", status="404") == 1
    assert moved(requests, route=key, method="other", status="405") == 1
    assert moved(requests, route="/health", method="GET", status="200") == 1
    assert moved(requests, route="/metrics", method="GET", status="200") == 1  # `before`
    total = sum(v for (name, _), v in after.items() if name == requests)
    assert total - sum(v for (name, _), v in before.items() if name == requests) == 12

    latency = "dache_http_request_duration_seconds"
    assert moved(f"{latency}_count", route=key, method="GET") == 3
    assert moved(f"{latency}_bucket", route=key, method="GET", le="+Inf") == 3
    assert moved(f"{latency}_sum", route=key, method="GET") > 0

    assert value(after, "dache_entries") == 1
    assert moved("dache_commit_batch_size_count") == 3  # two sets and a delete
    assert moved("dache_engine_write_duration_seconds_count") == 3
    assert value(after, "dache_engine_up", engine="disk") == 1  # the default engine
    assert value(after, "dache_build_info", version=dache.__version__) == 1
    assert ("dache_startup_load_seconds", frozenset()) in after
    assert value(after, "process_resident_memory_bytes") > 0


# -- in memory: the node's own numbers


def scrape_node(node: MemoryNode, **kwargs: Any) -> Samples:
    status, headers, body = get_metrics(node, **kwargs)
    assert status == 200
    return parse(body)


def get_metrics(node: MemoryNode, **kwargs: Any) -> tuple[int, Any, str]:
    response = done(node.http.get(BASE + "/metrics", **kwargs))
    return response.code, response.headers, done(response.text())


def with_metrics(engine: Any = None) -> tuple[MemoryNode, Metrics]:
    node = MemoryNode(engine=engine)
    metrics = Metrics(node.cache, node.committer, node.api.monitor, load_seconds=0.5)
    node.api.metrics = metrics
    return node, metrics


def test_cache_and_committer_metrics() -> None:
    node, _ = with_metrics()
    for key in ("a", "b", "c"):
        assert call(node, "POST", f"/dache/{key}", json={"value": key})[0] == 204
    assert call(node, "DELETE", "/dache/c")[0] == 204
    assert call(node, "POST", "/dache/t", json={"value": 1, "ttl": 5})[0] == 204
    node.clock.advance(6)
    node.cache.expire(node.clock.seconds())

    samples = scrape_node(node)
    assert value(samples, "dache_entries") == 2
    assert value(samples, "dache_bytes") == node.cache.bytes > 0
    assert value(samples, "dache_expired_entries_total") == 1
    assert value(samples, "dache_commit_batch_size_count") == 5
    assert value(samples, "dache_commit_batch_size_sum") == 5
    assert value(samples, "dache_commit_batch_size_bucket", le="1.0") == 5
    assert value(samples, "dache_engine_write_duration_seconds_count") == 5
    assert value(samples, "dache_engine_write_failures_total") == 0
    assert value(samples, "dache_startup_load_seconds") == 0.5


def test_engine_failures_and_engine_up() -> None:
    engine = SwitchableEngine()
    node, _ = with_metrics(engine)
    assert value(scrape_node(node), "dache_engine_up", engine="switchable") == 1

    engine.fail("connection refused")
    for i in range(3):
        assert call(node, "POST", f"/dache/k{i}", json={"value": i})[0] == 503
    samples = scrape_node(node)
    assert value(samples, "dache_engine_write_failures_total") == 3
    assert value(samples, "dache_engine_up", engine="switchable") == 0
    assert value(samples, "dache_commit_batch_size_count") == 0

    engine.recover()
    node.clock.advance(1.1)  # the scrape's engine check is no longer cached
    samples = scrape_node(node)
    assert value(samples, "dache_engine_up", engine="switchable") == 1
    assert engine.checks == 2


def test_openmetrics_is_served_when_asked_for() -> None:
    node, _ = with_metrics()
    status, headers, body = get_metrics(
        node, headers={"accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert status == 200
    assert headers.getRawHeaders("content-type")[0].startswith("application/openmetrics-text")
    assert body.endswith("# EOF\n")


def test_metrics_off_answers_404() -> None:
    node = MemoryNode()  # METRICS=false: the service passes no Metrics
    status, _, body = get_metrics(node)
    assert status == 404
    assert json.loads(body) == {"error": "metrics are turned off (METRICS=false)"}


def test_labels_stay_bounded() -> None:
    _, metrics = with_metrics()
    metrics.request_finished(b"BREW", b"/coffee/pot-1", 418, 0.001)
    metrics.request_finished(b"BREW", b"/coffee/pot-2", 418, 0.001)
    metrics.request_finished(b"GET", b"/dache/some-key", 200, 0.0001)
    metrics.request_finished(b"GET", b"/dache/other-key", 200, 0.0001)
    assert sorted(metrics.requests) == [
        ("/dache/{key}", "GET", 200),
        ("other", "other", 418),
    ]
    assert [h.count for _, h in sorted(metrics.requests.items())] == [2, 2]


@pytest.mark.parametrize(
    "observed, buckets",
    [
        ([1, 1, 2, 3], [("1.0", 2), ("2.0", 3), ("+Inf", 4)]),
        ([0.5, 2.0, 9], [("1.0", 1), ("2.0", 2), ("+Inf", 3)]),
    ],
)
def test_histogram_buckets_are_cumulative_and_inclusive(
    observed: list[float], buckets: list[tuple[str, int]]
) -> None:
    histogram = Histogram((1.0, 2.0))
    for v in observed:
        histogram.observe(v)
    assert histogram.buckets() == buckets
    assert histogram.sum == sum(observed)
