"""
makeService(config): the running node, started in order

    engine -> load into the cache -> committer -> expiry sweeper -> HTTP listener

so the port only accepts requests once the cache holds everything the engine
acknowledged; and stopped in reverse: stop listening, let in-flight writes
finish and be acknowledged, close the engine.
"""

from __future__ import annotations

import atexit
import os
import socket
import sys
import time
from typing import Any

from twisted.application import service
from twisted.internet import endpoints
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.error import CannotListenError
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from dache import filelimit, gcpolicy, mallocpolicy, systemd
from dache.config import Config
from dache.engines import SET, Change, create_engine
from dache.errors import ConfigError, StartupError
from dache.logs import offer_observer
from dache.store.cache import Cache
from dache.store.committer import Committer
from dache.store.eviction import LoadBound, MemoryBound
from dache.store.follow import FollowedCache
from dache.web import twisted_private
from dache.web.api import DacheAPI
from dache.web.auth import Access
from dache.web.health import HealthMonitor
from dache.web.metrics import Metrics
from dache.web.site import DacheSite
from dache.web.watch import Watchers
from dache.web.watch import attach as attach_watch
from dache.workers import LISTEN_FD_ENV, WorkerPool, is_worker, watch_supervisor

SWEEP_INTERVAL = 1.0  # seconds between expiry sweeps


def endpoint_description(config: Config) -> str:
    return config.listen or f"tcp:{config.port}"


def validate_endpoint(config: Config, reactor: Any) -> None:
    """Fail at start-up, with one line, on an endpoint string Twisted can't parse."""
    description = endpoint_description(config)
    try:
        endpoints.serverFromString(reactor, description)
    except Exception as e:  # also OSError, OpenSSL's Error: an ssl: key or cert it can't load
        raise ConfigError(f"--listen/LISTEN is not a valid server endpoint ({e})") from None


class DacheService(service.Service):
    """One dache node: engine, cache, committer and HTTP listener."""

    log = Logger()
    log_observer: Any = None  # set by dache.tap for LOG_FORMAT=json

    def __init__(self, config: Config, reactor: Any = None):
        if reactor is None:
            from twisted.internet import reactor
        self.config = config
        self.reactor = reactor
        self.cache = Cache()
        self.bound = MemoryBound(self.cache, config.max_memory, config.eviction_policy)
        self._loading = LoadBound(self.bound, config.max_memory)
        self._history_bytes = self.bound.reserve_history(config.watch_history_bytes)
        self.engine: Any = None
        self.committer: Committer | None = None
        self.api: DacheAPI | None = None
        self.health: HealthMonitor | None = None
        self.metrics: Metrics | None = None
        self.site: DacheSite | None = None
        self.watchers: Watchers | None = None
        self.port: Any = None
        self.started_at: float | None = None
        self._sweeper: LoopingCall | None = None
        self._starting: Deferred[None] | None = None
        self.workers: WorkerPool | None = None
        self._supervisor_watch: LoopingCall | None = None
        self.ready: Deferred[None] = Deferred()  # fires once listening
        self.systemd: systemd.SystemdNotifier | None = None

    def setServiceParent(self, parent: Any) -> None:
        # twistd picks its log observer from the application after this.
        offer_observer(parent, self.log_observer)
        super().setServiceParent(parent)

    def startService(self) -> None:
        super().startService()
        self.systemd = systemd.SystemdNotifier.from_environ(self.reactor)
        if self.systemd is not None:  # READY=1 once self.ready fires
            self.systemd.follow(self)
        self._starting = self._start()
        self._starting.addErrback(self._start_failed)

    @inlineCallbacks
    def _start(self) -> Any:
        config, reactor = self.config, self.reactor
        starting_at = reactor.seconds()  # uptime counts from here
        self.engine = create_engine(config, reactor)
        self.log.info("engine: {engine}", engine=self.engine.name)
        # An engine shared with other nodes hands their changes (and whatever a
        # write of unknown outcome did) to memory, by revision (dache.store.follow).
        follow = getattr(self.engine, "follow", None)
        followed = None
        if follow is not None:
            followed = FollowedCache(self.cache, reactor)
            follow(followed)

        filelimit.ensure(config, self.log)  # a descriptor per connection and watcher
        if config.max_memory:
            mallocpolicy.bound_heap()  # see dache.mallocpolicy: RSS near what is held
        began = time.monotonic()
        gcpolicy.pause()  # see dache.gcpolicy: the load makes no cycles
        try:
            if hasattr(self.engine, "load_entries"):  # the disk engine's compacted entries
                self.engine.load_entries = self._load_entries
            yield self.engine.load(self._apply_loaded)
            self.cache.expire(reactor.seconds())
            self._loading.finished()  # over MAX_MEMORY with noeviction: StartupError
            self.cache.index()  # one sort now, so the first list by prefix is fast
        finally:
            gcpolicy.settle()
        load_seconds = time.monotonic() - began
        self.log.info(
            "loaded {entries} entries in {load_seconds:.3f}s",
            entries=len(self.cache),
            load_seconds=load_seconds,
        )

        attach = getattr(self.engine, "attach", None)
        if attach is not None:
            attach(self.cache)  # an engine that compacts reads the live entries here
        self.committer = Committer(
            self.engine,
            self.cache,
            reactor,
            write_timeout=config.write_timeout,
            # A deleted key's revision is gone from the cache but not from the engine.
            revision=max(self.cache.max_revision(), getattr(self.engine, "revision", 0)),
            bound=self.bound,
        )
        if self._loading.evicted:  # durable before the node serves
            count = yield self._loading.delete_evicted(self.committer)
            self.log.info(
                "evicted {count} entries while loading: the engine held more than "
                "MAX_MEMORY={limit} bytes (EVICTION_POLICY={policy})",
                count=count,
                limit=config.max_memory,
                policy=config.eviction_policy,
            )
        self._sweeper = LoopingCall(self._sweep)
        self._sweeper.clock = reactor
        self._sweeper.start(SWEEP_INTERVAL, now=False)

        self.health = HealthMonitor(
            self.engine,
            self.committer,
            self.cache,
            reactor,
            timeout=config.health_timeout,
            started_at=starting_at,
        )
        if config.metrics:
            self.metrics = Metrics(self.cache, self.committer, self.health, load_seconds)
        self.api = DacheAPI(
            self.cache,
            self.committer,
            reactor,
            max_key_bytes=config.max_key_bytes,
            max_value_bytes=config.max_value_bytes,
            health=self.health,
            metrics=self.metrics,
            access=Access.from_config(config),
        )
        self.api.ui_enabled = config.ui
        self.watchers = attach_watch(
            self.api,
            self.committer,
            self.cache,
            reactor,
            config,
            followed,
            revision=self.committer.revision,
        )
        self.watchers.feed.history_bytes = self._history_bytes  # within MAX_MEMORY
        if self.metrics is not None:
            self.metrics.watchers = self.watchers
        self.site = DacheSite(
            self.api.resource(),
            max_body_bytes=config.max_value_bytes,
            access_log=config.access_log,
            redact_keys=config.logging_redact_keys,
            metrics=self.metrics,
            timeout=config.idle_timeout,
            request_timeout=config.request_timeout,
            max_connections=config.max_connections,
            output_buffer_bytes=config.output_buffer_bytes,
            pipeline_buffer_bytes=config.pipeline_buffer_bytes,
            send_timeout=config.send_timeout,
        )
        try:
            self.port = yield self._endpoint().listen(self.site)
        except CannotListenError as e:  # a port in use, or not ours to take
            raise StartupError(str(e)) from None
        except OSError as e:  # e.g. a unix socket in a folder that does not exist
            where = endpoint_description(self.config)
            raise StartupError(f"Couldn't listen on {where}: {e.strerror or e}") from None
        self.started_at = reactor.seconds()
        self.log.info("listening on {address}", address=_describe(self.port))
        if is_worker():
            self._supervisor_watch = watch_supervisor(reactor)
        elif config.workers > 1:
            self.workers = WorkerPool(reactor, config.workers - 1, self.port.fileno())
            self.workers.startService()
        self.ready.callback(None)

    def _endpoint(self) -> Any:
        inherited = os.environ.get(LISTEN_FD_ENV)
        if inherited is not None:  # a worker: accept on the supervisor's socket
            fd = int(inherited)
            family = socket.socket(fileno=os.dup(fd)).family
            return endpoints.AdoptedStreamServerEndpoint(self.reactor, fd, family)
        return endpoints.serverFromString(self.reactor, endpoint_description(self.config))

    def _apply_loaded(self, change: Change) -> None:
        if change.kind == SET:
            self.cache.set(change.key, change.value_json, change.expiry, change.revision)
        else:
            self.cache.delete(change.key)
        if self._loading.active:  # MAX_MEMORY: evict while loading, or refuse to start
            self._loading.loaded(change.key)

    def _load_entries(self, keys: list[str], entries: list[bytes], top: int) -> None:
        if not self._loading.active:
            self.cache.put_many(keys, entries, top)
            return
        # MAX_MEMORY: evict while loading, or refuse to start; key by key.
        for key, entry in zip(keys, entries, strict=True):
            self.cache.put(key, entry, top)
            self._loading.loaded(key)

    def _sweep(self) -> None:
        self.cache.expire(self.reactor.seconds())
        if self.committer is not None and self.bound.over():
            # Other nodes' changes (PostgreSQL) grew memory past our limit.
            self.bound.enforce(self.committer.submit_to)

    def _start_failed(self, failure: Failure) -> None:
        if failure.check(CancelledError) and not self.running:
            # Stopped while starting (e.g. SIGTERM while waiting for the engine).
            self.log.info("start-up cancelled")
            self.ready.errback(failure)
            return
        reason = failure.value
        if not isinstance(reason, StartupError | ConfigError):
            self.log.failure("dache could not start", failure)
        self.log.critical("dache could not start: {reason}", reason=str(reason))
        self.ready.errback(failure)
        exit_after_shutdown(1)
        if self.reactor.running:
            self.reactor.stop()
        else:  # an engine that failed before twistd started the reactor
            self.reactor.callWhenRunning(self.reactor.stop)

    @inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        if self.systemd is not None:
            self.systemd.stopping()
        if self._starting is not None and not self._starting.called:
            self._starting.cancel()
        stopping_workers = self.workers.stopService() if self.workers is not None else None
        if self._supervisor_watch is not None and self._supervisor_watch.running:
            self._supervisor_watch.stop()
        if self.watchers is not None:
            self.watchers.close()  # every stream ends cleanly, before the port closes
        if self.port is not None:
            yield self.port.stopListening()
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        if self.committer is not None:
            yield self.committer.drain()
        if stopping_workers is not None:
            yield stopping_workers
        if self.engine is not None:
            yield self.engine.close()
        self.log.info("dache stopped")
        # twistd re-raises the signal that stopped the reactor once it is done
        # (so the exit status would be "killed by SIGTERM"); a clean shutdown
        # exits 0, as process supervisors expect.
        twisted_private.forget_exit_signal(self.reactor)


def _describe(port: Any) -> str:
    address = port.getHost()
    host = getattr(address, "host", None)
    if host is not None:
        return f"{address.type.lower()}:{host}:{address.port}"
    return str(getattr(address, "name", address))


def exit_after_shutdown(status: int) -> None:
    """twistd always exits 0; make the process exit with `status` once it is done."""

    def _exit() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)

    atexit.register(_exit)


def makeService(config: Config, reactor: Any = None) -> DacheService:
    return DacheService(config, reactor)
