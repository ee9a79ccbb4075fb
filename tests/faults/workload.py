"""
Clients that record a history (tests/history.py) against a Cluster: each
client is a thread bound to one node, doing one operation at a time.

Keys: every node has "home" keys, written only through it (sets and
deletes) and read by every node; "shared" keys are read and then written
with If-Match from every node (compare-and-set races).
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from urllib.parse import quote

from tests.faults.cluster import Cluster, Node
from tests.history import DELETE, FAIL, OK, READ, SET, UNKNOWN, History

HOME_KEYS = 4  # per node
SHARED_KEYS = 3
REQUEST_TIMEOUT = 6.0  # over WRITE_TIMEOUT: a write that takes longer is in doubt


def home_keys(node: Node) -> list[str]:
    return [f"{node.name}/h{i}" for i in range(HOME_KEYS)]


SHARED = [f"shared/s{i}" for i in range(SHARED_KEYS)]


class Workload:
    def __init__(self, cluster: Cluster, seed: int, clients_per_node: int = 2):
        self.cluster = cluster
        self.history = History()
        self.random = random.Random(seed)
        self.clients_per_node = clients_per_node
        self.home = {key: node.name for node in cluster.nodes for key in home_keys(node)}
        self.keys = sorted(self.home) + (SHARED if len(cluster.nodes) > 1 else [])
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        client = 0
        for node in self.cluster.nodes:
            for _ in range(self.clients_per_node):
                seed = self.random.randrange(1 << 30)
                thread = threading.Thread(
                    target=self._client, args=(client, node, random.Random(seed)), daemon=True
                )
                self._threads.append(thread)
                thread.start()
                client += 1

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(REQUEST_TIMEOUT + 5)

    # -- one client

    def _client(self, client: int, node: Node, rng: random.Random) -> None:
        own = home_keys(node)
        while not self._stop.is_set():
            roll = rng.random()
            if roll < 0.35:
                self.set(client, node, rng.choice(own))
            elif roll < 0.42:
                self.delete(client, node, rng.choice(own))
            elif roll < 0.55 and len(self.keys) > len(self.home):
                key = rng.choice(SHARED)
                revision = self.read(client, node, key)
                self.set(client, node, key, if_match=revision or 0)
            else:
                self.read(client, node, rng.choice(self.keys))
            time.sleep(rng.uniform(0, 0.01))

    def set(self, client: int, node: Node, key: str, if_match: int | None = None) -> None:
        value = self.history.unique_value(client)
        op = self.history.invoke(client, node.name, key, SET, value=value, if_match=if_match)
        headers = {"If-Match": f'"{if_match}"'} if if_match is not None else {}
        body = json.dumps({"value": value}).encode()
        self._write(op, node, "PUT", key, body, headers)

    def delete(self, client: int, node: Node, key: str) -> None:
        op = self.history.invoke(client, node.name, key, DELETE)
        self._write(op, node, "DELETE", key, None, {})

    def _write(self, op, node, method, key, body, headers) -> None:
        try:
            status, answer, text = request(node, method, key, body, headers)
        except ConnectionRefusedError as e:
            History.complete(op, FAIL, note=f"refused: {e}")  # never reached dache
            return
        except (OSError, http.client.HTTPException) as e:
            History.complete(op, UNKNOWN, note=f"{type(e).__name__}: {e}")
            return
        if status == 204:
            History.complete(op, OK, status=status, revision=etag(answer))
        elif status < 500:
            History.complete(op, FAIL, status=status, note=text[:200])
        else:  # 503: the engine did not answer in time, or the connection dropped mid-write
            History.complete(op, UNKNOWN, status=status, note=text[:200])

    def read(self, client: int, node: Node, key: str) -> int | None:
        op = self.history.invoke(client, node.name, key, READ)
        try:
            status, answer, text = request(node, "GET", key, None, {})
        except (OSError, http.client.HTTPException) as e:
            History.complete(op, FAIL, note=f"{type(e).__name__}: {e}")  # a read changes nothing
            return None
        if status == 200:
            revision = etag(answer)
            History.complete(
                op, OK, status=status, revision=revision, value=json.loads(text)["value"]
            )
            return revision
        if status == 404:
            History.complete(op, OK, status=status)
            return None
        History.complete(op, FAIL, status=status, note=text[:200])
        return None


def request(node: Node, method: str, key: str, body: bytes | None, headers: dict):
    connection = http.client.HTTPConnection("127.0.0.1", node.port, timeout=REQUEST_TIMEOUT)
    try:
        connection.request(method, "/dache/" + quote(key, safe=""), body=body, headers=headers)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode()
    finally:
        connection.close()


def etag(headers: dict) -> int | None:
    value = {k.lower(): v for k, v in headers.items()}.get("etag")
    return int(value.strip('"')) if value else None
