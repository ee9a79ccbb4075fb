"""
WORKERS=N: N dache processes serving one listening socket, each a node.

The first process (the supervisor) listens as configured, then starts N-1
copies of its own command line that inherit the listening socket as fd 3
(DACHE_LISTEN_FD) and accept on it too; the kernel spreads connections over
them. Each worker is a full node (its own cache and committer), so they share
state only through the engine: WORKERS > 1 needs the postgres engine.

The supervisor restarts a worker that dies (with backoff), and on shutdown
sends every worker SIGTERM and waits for it. A worker whose supervisor is gone
shuts itself down, so a killed supervisor never leaves orphans serving.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from twisted.application import service
from twisted.internet import protocol
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

LISTEN_FD_ENV = "DACHE_LISTEN_FD"
WORKER_ENV = "DACHE_WORKER"
INHERITED_FD = 3
STOP_GRACE = 30.0  # seconds a worker gets to drain before SIGKILL


def is_worker() -> bool:
    return WORKER_ENV in os.environ


def worker_argv(argv: list[str]) -> list[str]:
    """The supervisor's command line for a worker: in the foreground, without a pidfile."""
    args = list(argv[1:])
    try:
        at = args.index("dache")
    except ValueError:
        at = len(args)
    # twistd options come before the "dache" subcommand; later ones win.
    return [sys.executable, argv[0], *args[:at], "--nodaemon", "--pidfile=", *args[at:]]


class _Worker(protocol.ProcessProtocol):
    def __init__(self, pool: WorkerPool, index: int):
        self.pool = pool
        self.index = index
        self.started_at = pool.reactor.seconds()
        self.ended: Deferred[None] = Deferred()

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)
        self.pool.worker_ended(self, reason.value)


class WorkerPool(service.Service):
    log = Logger()

    def __init__(self, reactor: Any, count: int, listen_fd: int, argv: list[str] | None = None):
        self.reactor = reactor
        self.count = count
        self.listen_fd = listen_fd
        self.argv = worker_argv(argv if argv is not None else sys.argv)
        self.workers: dict[int, _Worker] = {}
        self.backoff: dict[int, float] = {}

    def startService(self) -> None:
        super().startService()
        for index in range(1, self.count + 1):
            self.spawn(index)

    def spawn(self, index: int) -> None:
        if not self.running:
            return
        worker = _Worker(self, index)
        env = {**os.environ, LISTEN_FD_ENV: str(INHERITED_FD), WORKER_ENV: str(index)}
        self.reactor.spawnProcess(
            worker,
            self.argv[0],
            self.argv,
            env=env,
            childFDs={0: "w", 1: 1, 2: 2, INHERITED_FD: self.listen_fd},
        )
        self.workers[index] = worker
        self.log.info("started worker {index} (pid {pid})", index=index, pid=worker.transport.pid)

    def worker_ended(self, worker: _Worker, reason: Exception) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if not self.running:
            return
        # Restart with backoff; a worker that ran a while starts from 1 s again.
        ran = self.reactor.seconds() - worker.started_at
        delay = 1.0 if ran > 30 else min(self.backoff.get(worker.index, 0.5) * 2, 30.0)
        self.backoff[worker.index] = delay
        self.log.warn(
            "worker {index} exited ({reason}); restarting in {delay:g}s",
            index=worker.index,
            reason=str(reason),
            delay=delay,
        )
        self.reactor.callLater(delay, self.spawn, worker.index)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        ended = []
        for worker in list(self.workers.values()):
            ended.append(worker.ended)
            _signal(worker, signal.SIGTERM)
            timer = self.reactor.callLater(STOP_GRACE, _signal, worker, signal.SIGKILL)
            worker.ended.addBoth(lambda result, timer=timer: timer.active() and timer.cancel())
        return DeferredList(ended) if ended else succeed(None)


def _signal(worker: _Worker, number: int) -> None:
    try:
        worker.transport.signalProcess(number)
    except Exception:
        pass  # already gone


def watch_supervisor(reactor: Any, interval: float = 1.0) -> LoopingCall:
    """In a worker: stop when the supervisor that started us is gone."""
    parent = os.getppid()

    def check() -> None:
        if os.getppid() != parent and reactor.running:
            Logger().warn("supervisor (pid {pid}) is gone; stopping", pid=parent)
            reactor.stop()

    loop = LoopingCall(check)
    loop.clock = reactor
    loop.start(interval, now=False)
    return loop
