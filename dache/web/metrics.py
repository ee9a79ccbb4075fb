"""
Prometheus metrics, all in one place: what dache counts, and GET /metrics.

Each node has its own CollectorRegistry (not prometheus_client's global one),
so several nodes in one process (tests, embedding) never collide.

Cost on the hot path: a finished request costs one dict lookup and a bucket
increment (`request_finished`, called from DacheSite.log). Counts live in plain
ints keyed by (route, method, status) and become metric families only when
scraped, by a custom collector; no prometheus_client metric object, lock or
label lookup is touched per request. The gauges (entries, bytes, expired
entries, engine up) are read from the cache and the health monitor at scrape
time, so they cost nothing between scrapes. bench/metrics_overhead.py measures
what is left.

Labels are bounded: routes and methods are mapped onto fixed sets ("other"
for the rest), never keys or raw paths, so the exposition stays a few hundred
lines and is rendered on the reactor thread (about a millisecond) rather than
in a thread, which would need the counters copied under a lock.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString
from twisted.internet.defer import Deferred
from twisted.web.iweb import IRequest

import dache
from dache.engines import EngineUnavailable
from dache.store.cache import Cache
from dache.store.committer import Committer
from dache.web.health import HealthMonitor

KEY_PREFIX = b"/dache/"
KEY_ROUTE = "/dache/{key}"
ROUTES = {
    b"/health": "/health",
    b"/health/live": "/health/live",
    b"/health/ready": "/health/ready",
    b"/metrics": "/metrics",
    b"/dache": "/dache",  # the key space: list, range delete, batches
}
METHODS = {m: m.decode("ascii") for m in (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH")}

# Bucket bounds, in seconds or changes. A cache answers in well under a
# millisecond, so request latency starts at 50 microseconds.
REQUEST_SECONDS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
WRITE_SECONDS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_CHANGES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class Histogram:
    """Bucket counts and a sum in plain numbers; updated on the reactor thread only."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: the first bound >= value, as Prometheus' "le" means.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def add(self, other: Histogram) -> None:
        for i, n in enumerate(other.counts):
            self.counts[i] += n
        self.sum += other.sum

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative (le, count) pairs ending with +Inf, as exposition wants."""
        total = 0
        pairs = []
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            pairs.append((floatToGoString(bound), total))
        return pairs


class Metrics:
    """One node's metrics: the per-request hook, committer hooks and the registry."""

    def __init__(
        self,
        cache: Cache,
        committer: Committer,
        monitor: HealthMonitor,
        load_seconds: float | None = None,
        release: str = dache.__version__,
        process: bool = True,
    ):
        self.cache = cache
        self.memory = getattr(committer, "memory", None)  # dache.store.eviction.MemoryBound
        self.monitor = monitor
        self.engine_name = monitor.engine.name
        self.load_seconds = load_seconds
        self.release = release
        # (route, method, status) -> latency histogram; its count is the request count.
        self.requests: dict[tuple[str, str, int], Histogram] = {}
        self.batch_changes = Histogram(BATCH_CHANGES)
        self.write_seconds = Histogram(WRITE_SECONDS)
        self.write_failures = 0
        self.watchers: Any = None  # dache.web.watch.Watchers, set by the service
        committer.on_batch.append(self._batch_written)
        committer.on_failure.append(self._batch_failed)

        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_DacheCollector(self))
        if process:  # process_* (CPU, memory, fds), python_info and GC, from prometheus_client
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)

    # -- hooks

    def request_finished(self, method: bytes, path: bytes, status: int, seconds: float) -> None:
        """Count one answered request. Called for every request: keep it this small."""
        route = KEY_ROUTE if path.startswith(KEY_PREFIX) else ROUTES.get(path, "other")
        key = (route, METHODS.get(method, "other"), status)
        histogram = self.requests.get(key)
        if histogram is None:
            histogram = self.requests[key] = Histogram(REQUEST_SECONDS)
        # Histogram.observe, inlined: a method call is a third of this function's cost.
        histogram.counts[bisect_left(REQUEST_SECONDS, seconds)] += 1
        histogram.sum += seconds

    def _batch_written(self, size: int, seconds: float) -> None:
        self.batch_changes.observe(size)
        self.write_seconds.observe(seconds)

    def _batch_failed(self, error: EngineUnavailable) -> None:
        self.write_failures += 1

    # -- GET /metrics

    def render(self, request: IRequest) -> Deferred[bytes]:
        """The exposition, after a (cached) engine check so dache_engine_up is fresh."""
        d = self.monitor.check_engine()
        d.addCallback(lambda _: self._render(request))
        return d

    def _render(self, request: IRequest) -> bytes:
        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        encode, content_type = choose_encoder(accept)
        request.setHeader(b"content-type", content_type.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return encode(self.registry)


def memory_metrics(cache: Cache, bound: Any) -> Iterator[Metric]:
    """MAX_MEMORY: used and limit, evictions by policy, writes refused for memory."""
    used = GaugeMetricFamily(
        "dache_memory_used_bytes",
        "Bytes the entries take in memory (keys, bodies, per-entry overhead), as MAX_MEMORY "
        "counts them.",
    )
    used.add_metric([], cache.used)
    yield used
    limit = GaugeMetricFamily("dache_memory_limit_bytes", "MAX_MEMORY (0: no limit).")
    limit.add_metric([], 0 if bound is None else bound.limit)
    yield limit
    evicted = CounterMetricFamily(
        "dache_evicted_keys",
        "Keys deleted (durably) to stay within MAX_MEMORY.",
        labels=["policy"],
    )
    policy = "noeviction" if bound is None else bound.policy
    evicted.add_metric([policy], 0 if bound is None else bound.evicted)
    yield evicted
    refused = CounterMetricFamily(
        "dache_writes_refused", "Writes refused (507) for want of memory.", labels=["reason"]
    )
    refused.add_metric(["memory"], 0 if bound is None else bound.refused)
    yield refused


def watch_metrics(watchers: Any) -> Iterator[Metric]:
    """Watch streams and blocking reads (dache.web.watch)."""
    open_ = GaugeMetricFamily(
        "dache_watchers", "Watch streams and blocking reads open.", labels=["kind"]
    )
    open_.add_metric(["stream"], len(watchers.streams))
    open_.add_metric(["long_poll"], len(watchers.polls))
    yield open_
    sent = CounterMetricFamily("dache_watch_events_sent", "Events sent to watch streams.")
    sent.add_metric([], watchers.events_sent)
    yield sent
    dropped = CounterMetricFamily(
        "dache_watchers_dropped_slow", "Watch streams dropped past WATCH_BUFFER (not reading)."
    )
    dropped.add_metric([], watchers.dropped_slow)
    yield dropped


class _DacheCollector:
    """Turns the plain counters into metric families when scraped."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []  # names vary with what was seen; skip the registry's duplicate check

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        yield from self._requests(m)

        entries = GaugeMetricFamily("dache_entries", "Entries held in memory (expired included).")
        entries.add_metric([], len(m.cache))
        yield entries
        held = GaugeMetricFamily(
            "dache_bytes", "Approximate bytes held in memory: keys and rendered entries."
        )
        held.add_metric([], m.cache.bytes)
        yield held
        expired = CounterMetricFamily(
            "dache_expired_entries_total", "Entries removed because they expired."
        )
        expired.add_metric([], m.cache.expired_total)
        yield expired

        batches = HistogramMetricFamily(
            "dache_commit_batch_size",
            "Changes per batch the committer wrote to the engine (count: batches).",
        )
        batches.add_metric([], m.batch_changes.buckets(), m.batch_changes.sum)
        yield batches
        writes = HistogramMetricFamily(
            "dache_engine_write_duration_seconds",
            "Seconds the engine took to make a batch durable.",
        )
        writes.add_metric([], m.write_seconds.buckets(), m.write_seconds.sum)
        yield writes
        failures = CounterMetricFamily(
            "dache_engine_write_failures_total", "Batches the engine failed to make durable."
        )
        failures.add_metric([], m.write_failures)
        yield failures

        up = GaugeMetricFamily(
            "dache_engine_up",
            "1 if the durability engine answers and writes succeed, else 0.",
            labels=["engine"],
        )
        up.add_metric([m.engine_name], 1 if m.monitor.engine_up else 0)
        yield up
        probe = m.monitor.probe
        if probe is not None:
            check = GaugeMetricFamily(
                "dache_engine_check_seconds",
                "Response time of the latest engine health check.",
                labels=["engine"],
            )
            check.add_metric([m.engine_name], probe.seconds)
            yield check
        if m.load_seconds is not None:
            load = GaugeMetricFamily(
                "dache_startup_load_seconds", "Seconds start-up took to load the engine's content."
            )
            load.add_metric([], m.load_seconds)
            yield load
        yield from memory_metrics(m.cache, m.memory)
        if m.watchers is not None:
            yield from watch_metrics(m.watchers)
        yield InfoMetricFamily("dache_build", "dache's version.", value={"version": m.release})

    @staticmethod
    def _requests(m: Metrics) -> Iterator[Metric]:
        counts = CounterMetricFamily(
            "dache_http_requests_total",
            "HTTP requests answered, by route, method and status.",
            labels=["route", "method", "status"],
        )
        latency: dict[tuple[str, str], Histogram] = {}
        for (route, method, status), histogram in sorted(m.requests.items()):
            counts.add_metric([route, method, str(status)], histogram.count)
            merged = latency.get((route, method))
            if merged is None:
                merged = latency[(route, method)] = Histogram(REQUEST_SECONDS)
            merged.add(histogram)
        yield counts
        seconds = HistogramMetricFamily(
            "dache_http_request_duration_seconds",
            "Seconds from a request's last byte received to its answer sent, by route and method.",
            labels=["route", "method"],
        )
        for (route, method), histogram in latency.items():
            seconds.add_metric([route, method], histogram.buckets(), histogram.sum)
        yield seconds
