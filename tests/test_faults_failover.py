"""
PostgreSQL failover under a recorded write load: three `twistd -n dache`
nodes given a primary and its synchronous standby (pg_auto_failover,
tests/faults/failover.py) as POSTGRES_HOST=a,b; the primary is killed with
kill -9 (its postgres and its keeper) and the standby promoted, twice, while
clients record a history that tests/history.py checks.
"""

import pytest

from tests.faults.cluster import Cluster
from tests.faults.failover import HAPostgres
from tests.faults.runner import run, summary

WRITES_BACK_WITHIN = 15.0  # seconds: the bound the README states


@pytest.fixture
def ha():
    server = HAPostgres.start_new()
    yield server
    server.destroy()


def test_a_killed_primary_loses_no_acknowledged_write_and_writes_resume(ha, tmp_path):
    cluster = Cluster.failover(ha, ha.create_database())
    cluster.start()
    try:
        result = run(cluster, ["failover"], 20, 2525, str(tmp_path), hold=(1.0, 1.5), gap=(2, 3))
    finally:
        cluster.stop()
    print(summary(result))  # shown with -s, and on failure
    assert result.report.anomalies == [], (result.anomalies_file, summary(result))
    assert result.nemesis_errors == []
    assert ha.failovers >= 2, summary(result)
    counts = result.report.counts
    assert counts.get("set ok", 0) > 50 and counts.get("read ok", 0) > 50, counts
    longest = max((w[1] for spans in result.windows.values() for w in spans), default=0.0)
    assert longest <= WRITES_BACK_WITHIN, summary(result)
    for node in cluster.nodes:
        assert "Traceback" not in node.output(), node.output()[-3000:]
        assert "reconnected to PostgreSQL" in node.output()
