"""
Several dache nodes on one PostgreSQL table, end to end: `twistd -n dache`
subprocesses sharing a database, written to and read from at random, cut off
from PostgreSQL, frozen, started late. Every wait polls with a deadline.
"""

import json
import os
import random
import signal
import threading
import time
from urllib.parse import quote

import psycopg2

KEYS = [f"k{i}" for i in range(12)]


def start(dache_process, database, **env):
    return dache_process(env={**database.env, **{k: str(v) for k, v in env.items()}})


def read(node, key):
    """(status, revision or None, value or None) as the node serves the key now."""
    status, headers, body = node.request("GET", "/dache/" + quote(key, safe=""))
    etag = {k.lower(): v for k, v in headers.items()}.get("etag")
    if status == 404:
        return 404, None, None
    assert status == 200, (status, body)
    return 200, int(etag.strip('"')), json.loads(body)["value"]


def write(node, key, value=None, delete=False, headers=None, **fields):
    """(status, revision from the ETag or None)."""
    if delete:
        status, answer, _ = node.request("DELETE", "/dache/" + quote(key, safe=""), None, headers)
    else:
        body = json.dumps({"value": value, **fields}).encode()
        status, answer, _ = node.request("PUT", "/dache/" + quote(key, safe=""), body, headers)
    etag = {k.lower(): v for k, v in answer.items()}.get("etag")
    return status, int(etag.strip('"')) if etag else None


def table(database, keys=KEYS):
    """What every node should serve: (200, revision, value) or 404, from the table."""
    now = time.time()
    rows = {
        key: (revision, value, expiry)
        for key, value, revision, expiry in database.sql(
            "SELECT key, value, revision, extract(epoch FROM expiry)::float8 FROM dache"
        )
    }
    state = {}
    for key in keys:
        row = rows.get(key)
        if row is None or (row[2] is not None and row[2] <= now):
            state[key] = (404, None, None)
        else:
            state[key] = (200, row[0], json.loads(row[1]))
    return state


def wait_until(condition, timeout=10.0, step=0.02):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(step)


def converged(nodes, database, keys=KEYS):
    expected = table(database, keys)
    return all({key: read(node, key) for key in keys} == expected for node in nodes)


def clean(*nodes):
    for node in nodes:
        output = node.output()
        assert "Traceback" not in output and "Unhandled" not in output, output


def admin_sql(database, query, params=None):
    """A statement on the server's admin database (works while `database` refuses connections)."""
    connection = psycopg2.connect(**database.server.conninfo())
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(query, params)
            return cursor.fetchall() if cursor.description else []
    finally:
        connection.close()


def backends(database):
    """Backend pids of dache connections (writes and following) to the database."""
    rows = admin_sql(
        database,
        "SELECT pid FROM pg_stat_activity WHERE datname = %s AND application_name LIKE 'dache%%'",
        (database.name,),
    )
    return {pid for (pid,) in rows}


class Watcher:
    """
    Polls every node for every key, checking that no node ever serves an older
    revision of a key than it served before or than it acknowledged a write
    of (read-your-writes), and that a revision always comes with the value that
    was written with it.
    """

    def __init__(self, nodes, keys=KEYS):
        self.nodes = nodes
        self.keys = keys
        self.written = {}  # revision -> value, from the writers' 204s
        self.seen = {}  # (node index, key) -> highest revision served or acknowledged
        self.lock = threading.Lock()
        self.problems = []
        self.reads = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def acknowledged(self, node, key, revision, value=None, delete=False):
        """A node answered a write with 204 and this revision."""
        index = self.nodes.index(node)
        with self.lock:
            if not delete:
                self.written[revision] = value
            self.seen[(index, key)] = max(self.seen.get((index, key), 0), revision)

    def _run(self):
        while not self.stop.is_set():
            for index, node in enumerate(self.nodes):
                key = random.choice(self.keys)
                with self.lock:
                    before = self.seen.get((index, key), 0)
                status, revision, value = read(node, key)
                self.reads += 1
                if status == 404:
                    continue
                if revision < before:
                    self.problems.append(f"node {index} went back on {key}: {before} -> {revision}")
                with self.lock:
                    self.seen[(index, key)] = max(self.seen.get((index, key), 0), revision)
                    if revision in self.written and self.written[revision] != value:
                        self.problems.append(
                            f"node {index} served {value!r} as revision {revision}"
                        )

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(10)


def random_writes(nodes, count, writers=4, ttl=None, keys=KEYS, watcher=None):
    """Sets, deletes and (with ttl) expiring sets of keys, each to a random node."""
    statuses = []

    def writer(number):
        rng = random.Random(number)
        for i in range(count // writers):
            node, key = rng.choice(nodes), rng.choice(keys)
            roll = rng.random()
            value = {"writer": number, "i": i}
            if roll < 0.25:
                status, revision = write(node, key, delete=True)
            else:
                fields = {"ttl": ttl} if ttl is not None and roll > 0.85 else {}
                status, revision = write(node, key, value, **fields)
            if status == 204 and watcher is not None:
                watcher.acknowledged(node, key, revision, value, delete=roll < 0.25)
            statuses.append(status)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return statuses


def test_three_nodes_converge_and_none_ever_serves_an_older_revision(dache_process, pg):
    nodes = [start(dache_process, pg) for _ in range(3)]
    with Watcher(nodes, KEYS[:4]) as watcher:
        # Many writers on few keys: nodes' own writes and others' interleave.
        statuses = random_writes(nodes, 600, writers=8, ttl=0.5, keys=KEYS[:4], watcher=watcher)
        statuses += random_writes(nodes, 200, ttl=0.5, watcher=watcher)
        wait_until(lambda: converged(nodes, pg))
    assert statuses.count(204) == len(statuses)
    assert watcher.problems == [] and watcher.reads > 100
    # Expiring sets are gone everywhere once expired, without anyone deleting them.
    time.sleep(0.6)
    assert converged(nodes, pg)
    clean(*nodes)


def test_a_node_cut_off_from_postgres_catches_up_completely(dache_process, pg):
    writer = start(dache_process, pg)
    others = backends(pg)
    cut = start(dache_process, pg)
    for key in KEYS:
        assert write(writer, key, "before")[0] == 204
    wait_until(lambda: converged([writer, cut], pg))

    # Only the cut node loses its connections, and may not come back for a while.
    admin_sql(pg, f'ALTER DATABASE "{pg.name}" ALLOW_CONNECTIONS false')
    victims = backends(pg) - others
    assert len(victims) == 3  # two pooled, one following
    admin_sql(
        pg, "SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (list(victims),)
    )
    wait_until(lambda: write(cut, "k0", "refused")[0] == 503)
    random_writes([writer], 200, ttl=1)  # sets, deletes, expiring sets
    for key in KEYS[:3]:
        assert write(writer, key, delete=True)[0] == 204
    assert write(writer, "k3", "short", ttl=1)[0] == 204
    assert read(cut, "k0")[2] == "before"  # still serving what it had

    admin_sql(pg, f'ALTER DATABASE "{pg.name}" ALLOW_CONNECTIONS true')
    wait_until(lambda: converged([writer, cut], pg))
    assert read(cut, "k1")[0] == 404
    wait_until(lambda: read(cut, "k3")[0] == 404, timeout=3)  # expired on its own
    assert write(cut, "k0", "after")[0] == 204
    wait_until(lambda: read(writer, "k0")[2] == "after")
    assert "following other nodes' changes again" in cut.output()
    clean(writer, cut)


def test_a_cas_race_over_three_nodes_has_exactly_one_winner_per_revision(dache_process, pg):
    nodes = [start(dache_process, pg) for _ in range(3)]
    status, first = write(nodes[0], "counter", 0)
    assert status == 204
    wait_until(lambda: all(read(node, "counter")[1] == first for node in nodes))

    # 50 updates of the same revision, at once, spread over the nodes.
    barrier = threading.Barrier(50)
    outcomes = []

    def update(number):
        node = nodes[number % 3]
        barrier.wait()
        outcomes.append(
            (number, *write(node, "counter", number, headers={"If-Match": f'"{first}"'}))
        )

    threads = [threading.Thread(target=update, args=(n,)) for n in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    winners = [(number, revision) for number, status, revision in outcomes if status == 204]
    assert len(winners) == 1
    assert sorted(status for _, status, _ in outcomes) == [204] + [412] * 49
    (winner, revision), *_ = winners
    assert all(rev == revision for _, status, rev in outcomes if status == 412)  # current ETag
    wait_until(lambda: all(read(node, "counter") == (200, revision, winner) for node in nodes))

    # Read-modify-write increments from every node: none lost, none doubled.
    wins = []

    def increment(number):
        node = nodes[number % 3]
        for _ in range(4):
            while True:
                _, current, value = read(node, "counter")
                status, revision = write(
                    node, "counter", value + 1, headers={"If-Match": f'"{current}"'}
                )
                if status == 204:
                    wins.append(current)
                    break
                assert status == 412

    write(nodes[0], "counter", 0)
    threads = [threading.Thread(target=increment, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(wins) == 24 and len(set(wins)) == 24  # one winner per revision
    wait_until(lambda: all(read(node, "counter")[2] == 24 for node in nodes))
    clean(*nodes)


def test_a_node_started_later_loads_the_current_state_then_follows(dache_process, pg):
    first = start(dache_process, pg)
    for i, key in enumerate(KEYS):
        assert write(first, key, i)[0] == 204
    for key in KEYS[:4]:
        assert write(first, key, delete=True)[0] == 204
    late = start(dache_process, pg)
    assert converged([first, late], pg)  # loaded before it listens
    assert write(first, "k5", "changed")[0] == 204
    assert write(first, "k6", delete=True)[0] == 204
    assert write(late, "k0", "from the late node")[0] == 204
    wait_until(lambda: converged([first, late], pg))
    assert read(first, "k0")[2] == "from the late node"
    clean(first, late)


def test_a_node_away_longer_than_the_tombstone_retention_reloads(dache_process, pg):
    settings = {"POSTGRES_TOMBSTONE_RETENTION": 0.2, "POSTGRES_PURGE_INTERVAL": 0.2}
    active = start(dache_process, pg, **settings)
    frozen = start(dache_process, pg, **settings)
    for key in KEYS:
        assert write(active, key, "v1")[0] == 204
    wait_until(lambda: converged([active, frozen], pg))

    frozen.proc.send_signal(signal.SIGSTOP)  # a stalled VM, a long GC pause
    try:
        for key in KEYS[:6]:
            assert write(active, key, delete=True)[0] == 204
        assert write(active, "k6", "v2")[0] == 204
        # The deletes' tombstones are pruned while the frozen node cannot read them.
        wait_until(lambda: pg.sql("SELECT count(*) FROM dache_deleted") == [(0,)], timeout=5)
        assert pg.sql("SELECT pruned_through > 0 FROM dache_meta") == [(True,)]
    finally:
        frozen.proc.send_signal(signal.SIGCONT)
    wait_until(lambda: converged([active, frozen], pg))
    assert "reloading the table" in frozen.output()
    assert "reloading the table" not in active.output()
    clean(active, frozen)


def test_two_workers_share_one_port_as_two_coherent_nodes(dache_process, pg):
    supervisor = start(dache_process, pg, WORKERS=2)
    try:
        wait_until(lambda: "started worker 1 (pid" in supervisor.output())
        worker_pid = int(supervisor.output().split("started worker 1 (pid ")[1].split(")")[0])
        wait_until(lambda: supervisor.output().count("listening on") == 2)  # both nodes up
        assert len(backends(pg)) == 6  # each with its own connections

        # Each process answers on the shared port by itself (the other one frozen),
        # and what one took, the other serves.
        def alone(pid, action):
            other = supervisor.proc.pid if pid == worker_pid else worker_pid
            os.kill(other, signal.SIGSTOP)
            try:
                return action()
            finally:
                os.kill(other, signal.SIGCONT)

        status, revision = alone(worker_pid, lambda: write(supervisor, "k", "from the worker"))
        assert status == 204
        served = alone(supervisor.proc.pid, lambda: read(supervisor, "k"))
        deadline = time.monotonic() + 5
        while served != (200, revision, "from the worker") and time.monotonic() < deadline:
            time.sleep(0.02)
            served = alone(supervisor.proc.pid, lambda: read(supervisor, "k"))
        assert served == (200, revision, "from the worker")
        status, revision = alone(supervisor.proc.pid, lambda: write(supervisor, "k", delete=True))
        assert status == 204
        wait_until(lambda: alone(worker_pid, lambda: read(supervisor, "k"))[0] == 404)
    finally:
        code = supervisor.terminate()
    assert code == 0
    wait_until(lambda: not _running(worker_pid))
    assert "dache stopped" in supervisor.output()
    clean(supervisor)


def _running(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False
