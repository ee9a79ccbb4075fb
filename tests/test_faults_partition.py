"""
A silent partition between one node and PostgreSQL: writes answer 503 within
WRITE_TIMEOUT instead of hanging, reads keep being served, /health turns
warn within HEALTH_TIMEOUT, the other node is unaffected, and once the
partition heals the node writes again by itself within 5 s. The writes left
in doubt are resolved (present or absent, never half) and the history
checker agrees.

Two kinds (tests/faultproxy.py): a short blackhole in the proxy (nothing
forwarded, nothing reset), and packets dropped by the kernel for longer than
TCP keepalives and tcp_user_timeout take to give the connections up, so the
node must reconnect once the network is back.
"""

import json
import time

import pytest

from tests.faults.cluster import NODE_SETTINGS, Cluster, converge, read
from tests.faults.workload import Workload
from tests.history import OK, UNKNOWN, assert_clean, check

WRITE_TIMEOUT = float(NODE_SETTINGS["WRITE_TIMEOUT"])
HEALTH_TIMEOUT = float(NODE_SETTINGS["HEALTH_TIMEOUT"])
MARGIN = 2.0  # a shared 2-core machine
RECOVERY = 5.0  # seconds from healing to the first acknowledged write


def health(node):
    status, _, body = node.process.request("GET", "/health", timeout=10)
    return status, json.loads(body)["status"]


def poll(condition, timeout, step=0.05):
    """Seconds until condition() held; AssertionError after timeout."""
    began = time.monotonic()
    while not condition():
        assert time.monotonic() - began < timeout, "condition not met in time"
        time.sleep(step)
    return time.monotonic() - began


@pytest.mark.parametrize("fault, hold", [("blackhole", 4.0), ("drop", 24.0)])
def test_a_silent_partition_from_postgres_fails_writes_fast_and_heals_by_itself(
    own_postgres, own_pg, tmp_path, fault, hold
):
    cluster = Cluster.postgres(own_postgres, own_pg, count=2)
    try:
        cluster.start()
        cut_off, other = cluster.nodes
        load = Workload(cluster, seed=15)
        history = load.history
        key, other_key = "n1/h0", "n2/h0"
        load.set(0, cut_off, key)
        assert history.ops[-1].outcome == OK
        assert health(cut_off) == (200, "pass")

        getattr(cut_off.proxy, fault)()
        partitioned = time.monotonic()
        # the engine's round trip times out after HEALTH_TIMEOUT; an answer is
        # reused for up to a second
        warned = poll(lambda: health(cut_off) == (200, "warn"), HEALTH_TIMEOUT + 1 + MARGIN)
        while time.monotonic() - partitioned < hold:
            load.set(0, cut_off, key)
            write = history.ops[-1]
            assert write.status == 503 and write.outcome == UNKNOWN, write
            assert write.answered - write.invoke < WRITE_TIMEOUT + MARGIN, write
            load.read(1, cut_off, key)  # reads are served from memory meanwhile
            assert history.ops[-1].status == 200
            assert history.ops[-1].answered - history.ops[-1].invoke < 1.0
            load.set(2, other, other_key)  # the other node is not cut off
            assert history.ops[-1].outcome == OK
            assert health(cut_off) == (200, "warn")

        cut_off.proxy.heal()
        healed = time.monotonic()

        def writes_again():
            load.set(0, cut_off, key)
            return history.ops[-1].outcome == OK

        recovered = poll(writes_again, RECOVERY, step=0.1)
        # and it follows the other node again: serves the write it took meanwhile
        latest = [op for op in history.ops if op.key == other_key and op.outcome == OK][-1]
        followed = poll(
            lambda: read(cut_off, other_key) == (latest.revision, latest.value),
            RECOVERY - (time.monotonic() - healed),
        )
        failed = [o for o in history.ops if o.status == 503]
        slowest = max(o.answered - o.invoke for o in failed)
        fast = [o.invoke - partitioned for o in failed if o.answered - o.invoke < 0.5]
        print(
            f"{fault}: {len(failed)} writes 503, slowest {slowest:.2f} s, at once from "
            f"{min(fast, default=hold):.1f} s (connections given up); warn after {warned:.2f} s; "
            f"writes acknowledged {recovered:.2f} s after healing, follows again after "
            f"{recovered + followed:.2f} s"
        )
        poll(lambda: health(cut_off) == (200, "pass"), RECOVERY - (time.monotonic() - healed) + 2)

        final = converge(cluster, [key, other_key])
        report = check(history.ops, final, {key: "n1", other_key: "n2"})
        assert_clean(report, history.ops, str(tmp_path))
        assert any(op.outcome == UNKNOWN for op in history.ops)
        assert final[key][1] == history.ops[-1].value  # the last acknowledged write won
    finally:
        cluster.stop()
