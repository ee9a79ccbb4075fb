"""
Health: what /health, /health/live and /health/ready answer, and the engine
outage log.

The answers follow the health-check response format for HTTP APIs
(draft-inadarei-api-health-check, `application/health+json`):

    {"status": "pass" | "warn" | "fail", "version": ..., "releaseId": ...,
     "checks": {"engine:responseTime": [...], "cache:entries": [...], ...}}

- pass: the engine answered its round trip and writes are not failing.
- warn: the engine is down (its check failed or timed out, or the latest write
  failed). Reads are still served from memory, so this is still 200.
- fail: dache cannot serve at all (it is shutting down): 503.

The engine's round trip (`engine.check()`) is bounded by a timeout and its
result is kept for MAX_AGE seconds, so a storm of probes reaches the engine
about once a second; probes arriving while one is in flight share it.

Whether the engine is up is decided by the newest signal among health checks
and committed batches (the committer's on_batch / on_failure hooks), so a
failed write marks it down at once and a passing check brings it back even if
no write comes along. Each outage is logged once when it starts and once when
it ends, with its duration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

import dache
from dache.engines import Engine, EngineHealth, EngineUnavailable
from dache.rendering import render_json
from dache.store.cache import Cache
from dache.store.committer import Committer

HEALTH_JSON = b"application/health+json"
MAX_AGE = 1.0  # seconds an engine check result is reused
PASS, WARN, FAIL = "pass", "warn", "fail"


def api_version(release: str) -> str:
    """The public API version: the major number, or major.minor while 0.x (semver)."""
    parts = release.split(".")
    return ".".join(parts[:2]) if parts[0] == "0" else parts[0]


def iso_time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


@dataclass
class EngineProbe:
    """The result of one engine round trip."""

    ok: bool
    detail: str  # for a person; never a secret
    seconds: float  # response time
    at: float  # clock time the answer came
    extra: dict[str, Any] = field(default_factory=dict)


class HealthMonitor:
    log = Logger()

    def __init__(
        self,
        engine: Engine,
        committer: Committer,
        cache: Cache,
        clock: Any,
        timeout: float = 1.0,
        started_at: float | None = None,
        max_age: float = MAX_AGE,
        release: str = dache.__version__,
    ):
        self.engine = engine
        self.committer = committer
        self.cache = cache
        self.clock = clock
        self.timeout = timeout
        self.started_at = clock.seconds() if started_at is None else started_at
        self.max_age = max_age
        self.release = release
        self.probe: EngineProbe | None = None  # the latest engine round trip
        self._waiters: list[Deferred[EngineProbe]] = []  # non-empty: a probe is in flight
        # Engine state: the newest signal wins.
        self.down_since: float | None = None
        self.last_error: str | None = None
        self._state_at = float("-inf")
        committer.on_batch.append(self._batch_written)
        committer.on_failure.append(self._batch_failed)

    @property
    def engine_up(self) -> bool:
        return self.down_since is None

    # -- the engine round trip, cached

    def check_engine(self) -> Deferred[EngineProbe]:
        """The engine's round trip, reused if younger than max_age."""
        probe = self.probe
        if probe is not None and self.clock.seconds() - probe.at < self.max_age:
            return succeed(probe)
        d: Deferred[EngineProbe] = Deferred()
        self._waiters.append(d)
        if len(self._waiters) == 1:
            self._start_probe()
        return d

    def _start_probe(self) -> None:
        started = self.clock.seconds()
        d = maybeDeferred(self.engine.check)
        d.addTimeout(self.timeout, self.clock)
        d.addErrback(self._check_failed)
        d.addCallback(self._probed, started)

    def _check_failed(self, failure: Failure) -> EngineHealth:
        if failure.check(TimeoutError):
            detail = f"no answer to the health check within {self.timeout:g}s"
        elif failure.check(EngineUnavailable):
            detail = str(failure.value)
        else:
            self.log.failure("engine health check failed unexpectedly", failure)
            detail = "engine health check failed unexpectedly; see the server log"
        return EngineHealth(ok=False, detail=detail)

    def _probed(self, health: EngineHealth, started: float) -> None:
        now = self.clock.seconds()
        self.probe = EngineProbe(health.ok, health.detail, now - started, now, dict(health.extra))
        self._engine_state(health.ok, health.detail, started)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(self.probe)

    # -- engine state and the outage log

    def _batch_written(self, size: int, seconds: float) -> None:
        self._engine_state(True, "", self.clock.seconds())

    def _batch_failed(self, error: EngineUnavailable) -> None:
        self._engine_state(False, str(error), self.clock.seconds())

    def _engine_state(self, ok: bool, error: str, as_of: float) -> None:
        if as_of < self._state_at:
            return  # a check that began before a newer write result
        self._state_at = as_of
        now = self.clock.seconds()
        if ok:
            if self.down_since is not None:
                self.log.info(
                    "durability engine {engine} is back after an outage of {outage_seconds:.1f}s",
                    engine=self.engine.name,
                    outage_seconds=now - self.down_since,
                )
            self.down_since = None
            self.last_error = None
        else:
            if self.down_since is None:
                self.down_since = now
                self.log.warn(
                    "durability engine {engine} is down: {error}",
                    engine=self.engine.name,
                    error=error,
                )
            self.last_error = error

    # -- the three answers: (HTTP status, health+json document)

    def health(self) -> Deferred[tuple[int, dict[str, Any]]]:
        return self.check_engine().addCallback(self._health)

    def _health(self, probe: EngineProbe) -> tuple[int, dict[str, Any]]:
        now = self.clock.seconds()
        stamp = iso_time(now)
        status, output = self._status()
        engine_check: dict[str, Any] = {
            "componentId": self.engine.name,
            "componentType": "datastore",
            "observedValue": round(probe.seconds * 1000, 3),
            "observedUnit": "ms",
            "status": PASS if probe.ok else WARN,
            "time": iso_time(probe.at),
            **probe.extra,
        }
        if not probe.ok:
            engine_check["output"] = probe.detail
        writes_check: dict[str, Any] = {
            "componentId": self.engine.name,
            "componentType": "datastore",
            "status": PASS if self.last_error is None else WARN,
            "time": stamp,
        }
        if self.last_error is not None:
            writes_check["output"] = self.last_error
            writes_check["downSince"] = iso_time(self.down_since or now)
        document: dict[str, Any] = {
            "status": status,
            "version": api_version(self.release),
            "releaseId": self.release,
            "serviceId": "dache",
            "description": "dache, a durable cache",
        }
        if output:
            document["output"] = output
        document["checks"] = {
            "engine:responseTime": [engine_check],
            "engine:writes": [writes_check],
            "cache:entries": [self._measure(len(self.cache), None, stamp)],
            "cache:bytes": [self._measure(self.cache.bytes, "bytes", stamp)],
            # MAX_MEMORY (dache.store.eviction): what the entries take, and the limit (0: none).
            "memory:used": [self._measure(self.cache.used, "bytes", stamp)],
            "memory:limit": [self._measure(self._memory_limit(), "bytes", stamp)],
            "uptime": [
                {
                    "componentType": "system",
                    "observedValue": round(now - self.started_at, 3),
                    "observedUnit": "s",
                    "status": PASS,
                    "time": stamp,
                }
            ],
        }
        return (503 if status == FAIL else 200), document

    def _memory_limit(self) -> int:
        bound = getattr(self.committer, "memory", None)
        return 0 if bound is None else bound.limit

    @staticmethod
    def _measure(value: int, unit: str | None, stamp: str) -> dict[str, Any]:
        check: dict[str, Any] = {"componentType": "component", "observedValue": value}
        if unit is not None:
            check["observedUnit"] = unit
        check.update(status=PASS, time=stamp)
        return check

    def _status(self) -> tuple[str, str]:
        if self.committer.closing:
            return FAIL, "dache is shutting down"
        if not self.engine_up:
            return WARN, (
                f"durability engine {self.engine.name} is down ({self.last_error}): "
                "reads are served, writes fail"
            )
        return PASS, ""

    def live(self) -> Deferred[tuple[int, dict[str, Any]]]:
        """Liveness: the reactor answers. Never depends on the engine."""
        return succeed((200, {"status": PASS}))

    def ready(self) -> Deferred[tuple[int, dict[str, Any]]]:
        """Readiness: 200 only when a write would succeed now."""
        return self.check_engine().addCallback(self._ready)

    def _ready(self, probe: EngineProbe) -> tuple[int, dict[str, Any]]:
        status, output = self._status()
        if status == PASS:
            return 200, {"status": PASS}
        return 503, {"status": FAIL, "output": output}


def respond(result: tuple[int, dict[str, Any]], request: IRequest) -> bytes:
    """Write a (status, document) answer as application/health+json."""
    status, document = result
    if not getattr(request, "health_detail", True):  # set by dache.web.auth
        document = {"status": document.get("status", "unknown")}
    request.setResponseCode(status)
    request.setHeader(b"content-type", HEALTH_JSON)
    request.setHeader(b"cache-control", b"no-store")
    return render_json(document)
