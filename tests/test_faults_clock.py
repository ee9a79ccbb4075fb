"""
Clock skew and expiry: one node's wall clock runs SKEW seconds ahead
(libfaketime). The README's assumption, checked: each node stops serving an
entry at its expiry instant by its own clock, so the skewed node stops SKEW
seconds early and the others on time; and the skewed node's durable purge
does not take the entry from a node that (re)loads the table before the
entry's expiry by that node's own clock.
"""

import time

from tests.faults.cluster import Cluster, read
from tests.faults.skew import skewed

SKEW = 8.0
LEAD = 12.0  # seconds from the write to the expiry
MARGIN = 1.0  # a shared 2-core machine, and the poll step


def test_each_node_expires_by_its_own_clock_and_a_fast_clock_purges_nothing_early(
    own_postgres, own_pg
):
    cluster = Cluster.postgres(own_postgres, own_pg, count=3)
    on_time, fast, late_starter = cluster.nodes
    fast.env = skewed(fast.env, SKEW)
    try:
        on_time.start()
        fast.start()
        expiry = time.time() + LEAD
        body = f'{{"value": "expiring", "expiry": {expiry}}}'.encode()
        status, _, _ = on_time.process.request("PUT", "/dache/e", body)
        assert status == 204
        stopped = {}
        seen = set()  # a node counts as stopped only after it served the entry (follow lag)
        deadline = expiry + 2 * MARGIN
        while time.time() < deadline and len(stopped) < 3:
            now = time.time()
            if late_starter.process is None and now > expiry - SKEW + MARGIN + 1.5:
                # the fast node has expired the entry and had purges (every 1 s)
                # run: the row must still be in the table, and a node loading
                # the table now must still get it
                assert [k for (k,) in own_pg.sql("SELECT key FROM dache")] == ["e"], "purged early"
                late_starter.start()
                assert read(late_starter, "e") != (None, None), "purged early by a fast clock"
                assert time.time() < expiry - 0.2, "the late node started too late to tell"
            for node in cluster.nodes:
                if node.name not in stopped and node.process is not None:
                    if read(node, "e") != (None, None):
                        seen.add(node.name)
                    elif node.name in seen:
                        stopped[node.name] = time.time() - expiry
            time.sleep(0.05)
        assert set(stopped) == {"n1", "n2", "n3"}, stopped
        assert -SKEW - MARGIN < stopped["n2"] < -SKEW + MARGIN, stopped  # its clock says so
        for name in ("n1", "n3"):
            assert -0.1 < stopped[name] < MARGIN, stopped  # never early, nor much late
    finally:
        cluster.stop()
