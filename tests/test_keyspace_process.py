"""
The key space end to end: `twistd -n dache` subprocesses with the disk and
PostgreSQL engines, SIGKILLed mid-batch and restarted, and three nodes on one
PostgreSQL table incrementing one key. Every wait polls with a deadline.
"""

import json
import threading
import time
from http.client import HTTPConnection, HTTPException
from urllib.parse import quote

import pytest

KEYS = [f"k/{i:02d}" for i in range(20)]


@pytest.fixture(params=["disk", "postgres"])
def engine_env(request, tmp_path):
    if request.param == "disk":
        return {"DURABILITY_ENGINE": "disk", "DISK_PATH": str(tmp_path / "data")}
    return request.getfixturevalue("pg").env


def post_json(connection, method, path, document=None):
    body = None if document is None else json.dumps(document).encode()
    connection.request(method, path, body=body)
    response = connection.getresponse()
    return response.status, json.loads(response.read() or b"null")


def listing(node, prefix):
    status, _, body = node.request("GET", f"/dache?prefix={quote(prefix, safe='')}&limit=1000")
    assert status == 200, body
    return {entry["key"]: entry["value"] for entry in json.loads(body)["entries"]}


def test_a_batch_is_atomic_across_kill_9(dache_process, engine_env):
    node = dache_process(env=engine_env)
    acknowledged, sent = [], []
    stop = threading.Event()

    def write_batches():  # every batch sets all KEYS to its number: a torn one would mix them
        connection = HTTPConnection("127.0.0.1", node.port, timeout=10)
        try:
            for n in range(1, 10_000):
                if stop.is_set():
                    return
                sent.append(n)
                ops = [{"op": "set", "key": key, "value": n} for key in KEYS]
                status, _ = post_json(connection, "POST", "/dache", {"ops": ops})
                assert status == 200
                acknowledged.append(n)
        except (OSError, HTTPException):
            pass  # the kill

    writer = threading.Thread(target=write_batches, daemon=True)
    writer.start()
    deadline = time.monotonic() + 20
    while len(acknowledged) < 30:
        assert time.monotonic() < deadline and writer.is_alive(), "batches too slow"
        time.sleep(0.01)
    node.kill()
    stop.set()
    writer.join(10)

    again = dache_process(env=engine_env)
    values = listing(again, "k/")
    assert sorted(values) == KEYS
    assert len(set(values.values())) == 1, values  # all of one batch, none of another
    (survivor,) = set(values.values())
    assert acknowledged[-1] <= survivor <= sent[-1]


def test_range_delete_is_durable_across_restart(dache_process, engine_env):
    node = dache_process(env=engine_env)
    connection = HTTPConnection("127.0.0.1", node.port, timeout=10)
    ops = [{"op": "set", "key": f"r/{i}", "value": i} for i in range(50)]
    ops += [{"op": "set", "key": key, "value": "kept"} for key in ("r", "q/1", "s")]
    assert post_json(connection, "POST", "/dache", {"ops": ops})[0] == 200
    assert post_json(connection, "DELETE", "/dache?prefix=r%2F") == (200, {"deleted": 50})
    node.kill()

    again = dache_process(env=engine_env)
    assert listing(again, "r/") == {}
    assert listing(again, "") == {"q/1": "kept", "r": "kept", "s": "kept"}


def hammer(nodes, work, threads_per_node=2):
    """Run work(node) in threads_per_node threads per node; re-raise the first failure."""
    failures = []

    def run(node):
        try:
            work(node)
        except BaseException as e:
            failures.append(e)

    threads = [
        threading.Thread(target=run, args=(node,), daemon=True)
        for node in nodes
        for _ in range(threads_per_node)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive(), "a writer hung"
    if failures:
        raise failures[0]


def wait_for_value(nodes, key, expected, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        answers = [node.get(key) for node in nodes]
        if all(status == 200 and body["value"] == expected for status, body in answers):
            return
        assert time.monotonic() < deadline, answers
        time.sleep(0.02)


def test_three_nodes_incrementing_one_key_never_lose_one(dache_process, pg):
    nodes = [dache_process(env=pg.env) for _ in range(3)]

    def increment_50(node):
        connection = HTTPConnection("127.0.0.1", node.port, timeout=10)
        for _ in range(50):
            status, answer = post_json(connection, "PATCH", "/dache/hits", {"increment": 1})
            assert status == 200, answer

    hammer(nodes, increment_50, threads_per_node=4)  # 3 nodes x 4 threads x 50 = 600
    assert pg.sql("SELECT value FROM dache WHERE key = 'hits'") == [("600",)]
    wait_for_value(nodes, "hits", 600)


def test_concurrent_conditional_batches_on_three_nodes_lose_no_update(dache_process, pg):
    nodes = [dache_process(env=pg.env) for _ in range(3)]
    assert nodes[0].set("balance", 0) == 204
    wait_for_value(nodes, "balance", 0)  # the others follow it first: a get there is no miss

    def add_5_with_if_match(node):  # read, then write back +1 only if unchanged; retry
        connection = HTTPConnection("127.0.0.1", node.port, timeout=10)
        done, deadline = 0, time.monotonic() + 40
        while done < 5:
            assert time.monotonic() < deadline, "no progress"
            get = {"ops": [{"op": "get", "key": "balance"}]}
            _, answer = post_json(connection, "POST", "/dache", get)
            entry = answer["results"][0]
            write = {"op": "set", "key": "balance", "value": entry["value"] + 1}
            ops = [{**write, "if_match": entry["revision"]}, {"op": "get", "key": "balance"}]
            status, answer = post_json(connection, "POST", "/dache", {"ops": ops})
            assert status in (200, 412), answer
            if status == 200:
                assert answer["results"][1]["value"] == entry["value"] + 1
                done += 1

    hammer(nodes, add_5_with_if_match)  # 3 nodes x 2 threads x 5 = 30
    assert pg.sql("SELECT value FROM dache WHERE key = 'balance'") == [("30",)]
    wait_for_value(nodes, "balance", 30)
