"""
Faults injected into a Cluster while a Workload runs. Each nemesis starts a
fault, holds it, and heals it; a Schedule runs them one after another at
random (seeded), recording each fault's name, node and times.
"""

from __future__ import annotations

import os
import random
import threading
import time
from dataclasses import dataclass

from tests.faults.cluster import Cluster


@dataclass
class Fault:
    name: str
    node: str
    began: float
    ended: float | None = None


def kill(cluster: Cluster, node, hold: float) -> None:
    """kill -9, down for `hold` seconds, then restarted on the same port and data."""
    node.kill()
    time.sleep(hold)
    node.restart()


def power_loss(cluster: Cluster, node, hold: float) -> None:
    """
    kill -9, then the log grows by up to two 4 KiB blocks of zeros, as a file
    system leaves a file whose new size reached the disk before its data;
    restarted after `hold`. With DISK_FSYNC=always nothing acknowledged was
    in the page cache only, so this is what a power loss can do to the log.
    """
    node.kill()
    log = os.path.join(node.env["DISK_PATH"], "dache.log")
    with open(log, "ab") as f:
        f.write(bytes(1 + int(hold * 1000) % 8192))  # hold is the schedule's seeded draw
    time.sleep(hold)
    node.restart()


def pause(cluster: Cluster, node, hold: float) -> None:
    """SIGSTOP for `hold` seconds, then SIGCONT: a frozen process (GC pause, VM stall)."""
    node.pause()
    time.sleep(hold)
    node.resume()


def postgres_crash(cluster: Cluster, node, hold: float) -> None:
    """PostgreSQL stopped with `-m immediate` (a crash), started again after `hold`."""
    cluster.server.stop("immediate")
    time.sleep(hold)
    cluster.server.start()


def partition(cluster: Cluster, node, hold: float) -> None:
    """A silent partition between the node and PostgreSQL: no packets, no reset."""
    node.proxy.blackhole()
    time.sleep(hold)
    node.proxy.heal()


def drop(cluster: Cluster, node, hold: float) -> None:
    """The kernel drops every packet between the node and PostgreSQL (TCP retransmits)."""
    node.proxy.drop()
    time.sleep(hold)
    node.proxy.heal()


def slow(cluster: Cluster, node, hold: float) -> None:
    """Every packet between the node and PostgreSQL delayed 50 ms."""
    node.proxy.delay(0.05)
    time.sleep(hold)
    node.proxy.heal()


def cut(cluster: Cluster, node, hold: float) -> None:
    """Every connection between the node and PostgreSQL reset at once."""
    node.proxy.cut()


def failover(cluster: Cluster, node, hold: float) -> None:
    """
    kill -9 the PostgreSQL primary (its postgres and its pg_auto_failover
    keeper); once the standby is promoted, `hold` seconds later the old one
    rejoins as the new standby (tests.faults.failover).
    """
    old, _ = cluster.server.kill_primary()
    time.sleep(hold)
    cluster.server.rejoin(old)


NEMESES = {
    "kill": kill,
    "power-loss": power_loss,
    "pause": pause,
    "postgres-crash": postgres_crash,
    "partition": partition,
    "drop": drop,
    "slow": slow,
    "cut": cut,
    "failover": failover,
}
POSTGRES_ONLY = {"postgres-crash", "partition", "drop", "slow", "cut"}
DISK_ONLY = {"power-loss"}
FAILOVER_ONLY = {"failover"}  # a primary and a standby (Cluster.failover)


def available(cluster: Cluster) -> list[str]:
    if cluster.server is None:
        skip = POSTGRES_ONLY | FAILOVER_ONLY
    elif hasattr(cluster.server, "kill_primary"):  # nodes reach it directly: no proxies
        skip = POSTGRES_ONLY | DISK_ONLY
    else:
        skip = DISK_ONLY | FAILOVER_ONLY
    return [name for name in NEMESES if name not in skip]


class Schedule:
    """Faults one at a time: a quiet gap, a fault held a few seconds, healed."""

    def __init__(
        self,
        cluster: Cluster,
        names: list[str],
        seed: int,
        hold: tuple[float, float] = (1.0, 4.0),
        gap: tuple[float, float] = (1.0, 3.0),
    ):
        self.cluster = cluster
        self.names = names
        self.random = random.Random(seed)
        self.hold, self.gap = hold, gap
        self.faults: list[Fault] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nemesis", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(120)

    def run_one(self, name: str) -> None:
        node = self.random.choice(self.cluster.nodes)
        on_postgres = name in ("postgres-crash", "failover")
        fault = Fault(name, "postgres" if on_postgres else node.name, time.monotonic())
        self.faults.append(fault)
        try:
            NEMESES[name](self.cluster, node, self.random.uniform(*self.hold))
        except Exception as e:  # noqa: BLE001 - recorded, and the cluster is healed below
            self.errors.append(f"{name} on {fault.node}: {type(e).__name__}: {e}")
            self.cluster.heal()
        fault.ended = time.monotonic()

    def _run(self) -> None:
        turn = 0
        while not self._stop.wait(self.random.uniform(*self.gap)):
            # every nemesis in turn first, then at random
            name = self.names[turn] if turn < len(self.names) else self.random.choice(self.names)
            turn += 1
            self.run_one(name)
