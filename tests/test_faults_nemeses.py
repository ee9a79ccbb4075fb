"""
Short, fixed-seed checked runs (tests/faults/runner.py): clients record a
history against real `twistd -n dache` nodes while nemeses inject faults,
and tests/history.py checks it. `make torture` runs the same for longer.
"""

import pytest

from tests.faults import nemesis
from tests.faults.cluster import Cluster
from tests.faults.runner import run, summary

SHORT = {"hold": (1.0, 2.0), "gap": (0.5, 1.0)}


@pytest.fixture
def cluster_of():
    made = []

    def make(cluster):
        made.append(cluster)
        cluster.start()
        return cluster

    yield make
    for cluster in made:
        cluster.stop()


def checked(cluster, names, seconds, seed, tmp_path):
    result = run(cluster, names, seconds, seed, str(tmp_path), **SHORT)
    print(summary(result))  # shown with -s, and on failure
    if result.report.anomalies:
        raise AssertionError(
            f"{len(result.report.anomalies)} anomalies, first: "
            f"{result.report.anomalies[0].check}: {result.report.anomalies[0].message}; "
            f"the offending history is in {result.anomalies_file}\n{summary(result)}"
        )
    assert result.nemesis_errors == []
    assert {fault.name for fault in result.faults} >= set(names), "every nemesis ran"
    counts = result.report.counts
    assert counts.get("set ok", 0) > 50 and counts.get("read ok", 0) > 50, counts
    for node in cluster.nodes:
        assert "Traceback" not in node.output(), node.output()[-3000:]
    return result


def test_three_postgres_nodes_under_every_nemesis_keep_the_history_clean(
    own_postgres, own_pg, cluster_of, tmp_path
):
    cluster = cluster_of(Cluster.postgres(own_postgres, own_pg))
    names = nemesis.available(cluster)
    assert set(names) == set(nemesis.NEMESES) - nemesis.DISK_ONLY - nemesis.FAILOVER_ONLY
    checked(cluster, names, 24, seed=1515, tmp_path=tmp_path)


def test_the_disk_engine_under_kill_9_power_loss_and_sigstop_keeps_the_history_clean(
    cluster_of, tmp_path
):
    cluster = cluster_of(Cluster.disk())
    names = nemesis.available(cluster)
    assert set(names) == {"kill", "power-loss", "pause"}
    result = checked(cluster, names, 14, seed=1516, tmp_path=tmp_path)
    assert cluster.nodes[0].restarts >= 2
    assert "torn last record" in cluster.nodes[0].output()  # the zeros were cut off
    assert result.report.lag == []  # one node: every read is linearizability-checked
