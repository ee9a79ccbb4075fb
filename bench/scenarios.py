"""
What is measured: scenarios (a kind of request, a target server, a number of
connections, a value size) and the request files wrk replays for them.

Every dache figure is compared with the ceiling's figure for the same kind of
request (GET or POST), connections and value size; durable sets and GET hits
are also compared with etcd's put and range.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass

KEYS = 1000  # distinct keys each scenario cycles through

# Webdis + Redis, pinned like dache: kind -> the dache kind it is the peer of.
# "no", "everysec", "always": Redis's appendonly no / appendfsync everysec / always.
PEER_KINDS = {
    "webdis GET": "GET hit",
    "webdis SET no": "SET memory",
    "webdis SET everysec": "SET disk everysec",
    "webdis SET always": "SET disk",
}

# The whole machine (servers and wrk unpinned, wrk with two threads): dache
# WORKERS=2 (which needs the postgres engine) against Webdis threads=2 on a
# Redis with appendfsync always. Kind -> (the peer's kind, or None for a peer).
WHOLE_MACHINE_KINDS = {
    "GET hit, 2 workers": "webdis GET, 2 threads",
    "SET postgres, 2 workers": "webdis SET always, 2 threads",
    "webdis GET, 2 threads": None,
    "webdis SET always, 2 threads": None,
}

# kind -> (the ceiling kind it is compared with, whether 2xx is expected)
KINDS = {
    "ceiling GET": (None, True),
    "ceiling POST": (None, True),
    "GET hit": ("ceiling GET", True),
    "GET hit, metrics off": ("ceiling GET", True),
    "GET miss": ("ceiling GET", False),
    "SET memory": ("ceiling POST", True),
    "SET disk": ("ceiling POST", True),
    "SET postgres": ("ceiling POST", True),
    "DELETE": ("ceiling POST", True),
    "90/10 mix": ("ceiling GET", True),
    "etcd put": (None, True),
    "etcd range": (None, True),
    "SET disk everysec": ("ceiling POST", True),
    **{kind: (None, True) for kind in PEER_KINDS},
    **{kind: (None, True) for kind in WHOLE_MACHINE_KINDS},
}

# dache kind -> the etcd kind it is compared with
PEERS = {
    "SET disk": "etcd put",
    "SET postgres": "etcd put",
    "GET hit": "etcd range",
}


@dataclass(frozen=True)
class Scenario:
    kind: str
    target: str  # a server name from bench.run's TARGETS
    connections: int
    value_bytes: int

    @property
    def name(self) -> str:
        return f"{self.kind} c{self.connections} {_size(self.value_bytes)}"

    @property
    def ceiling_kind(self) -> str | None:
        return KINDS[self.kind][0]

    @property
    def expects_2xx(self) -> bool:
        return KINDS[self.kind][1]

    def counterpart(self, kind: str) -> tuple[str, int, int]:
        """The key of the scenario of `kind` this one is compared with."""
        return (kind, self.connections, self.value_bytes if kind != "GET miss" else 100)

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.kind, self.connections, self.value_bytes)


def _size(value_bytes: int) -> str:
    return f"{value_bytes // 1024} KiB" if value_bytes >= 1024 else f"{value_bytes} B"


def value_of(value_bytes: int) -> str:
    """A JSON string value whose JSON text is value_bytes long."""
    return "x" * max(value_bytes - 2, 0)


def set_body(value_bytes: int) -> str:
    return json.dumps({"value": value_of(value_bytes)})


def hit_key(value_bytes: int, i: int) -> str:
    return f"h{value_bytes}-{i}"


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def etcd_put_body(key: str, value_bytes: int) -> str:
    return json.dumps({"key": _b64(key), "value": _b64(value_of(value_bytes))})


def request_lines(kind: str, value_bytes: int) -> list[tuple[str, str, str]]:
    """(method, path, body) for each request a scenario of `kind` replays."""
    n = value_bytes
    if kind in ("ceiling GET", "GET hit", "GET hit, metrics off", "GET hit, 2 workers"):
        return [("GET", f"/dache/{hit_key(n, i)}", "") for i in range(KEYS)]
    if kind == "GET miss":
        return [("GET", f"/dache/missing-{i}", "") for i in range(KEYS)]
    if kind in (
        "ceiling POST",
        "SET memory",
        "SET disk",
        "SET disk everysec",
        "SET postgres",
        "SET postgres, 2 workers",
    ):
        body = set_body(n)
        return [("POST", f"/dache/s{n}-{i}", body) for i in range(KEYS)]
    if kind == "DELETE":
        return [("DELETE", f"/dache/d-{i}", "") for i in range(KEYS)]
    if kind == "90/10 mix":
        body = set_body(n)
        return [
            ("POST", f"/dache/{hit_key(n, i)}", body)
            if i % 10 == 9
            else ("GET", f"/dache/{hit_key(n, i)}", "")
            for i in range(KEYS)
        ]
    if kind == "etcd put":
        return [("POST", "/v3/kv/put", etcd_put_body(f"s{n}-{i}", n)) for i in range(KEYS)]
    if kind == "etcd range":
        return [
            ("POST", "/v3/kv/range", json.dumps({"key": _b64(hit_key(n, i))})) for i in range(KEYS)
        ]
    if kind.startswith("webdis GET"):
        # Webdis answers {"GET": "<the stored text>"}; the keys are GET hit's
        return [("GET", f"/GET/{hit_key(n, i)}", "") for i in range(KEYS)]
    if kind.startswith("webdis SET"):
        # PUT /SET/<key>: the body is the value, here the same JSON text dache stores
        body = json.dumps(value_of(n))
        return [("PUT", f"/SET/s{n}-{i}", body) for i in range(KEYS)]
    raise ValueError(f"unknown scenario kind {kind!r}")


def write_request_file(directory: str, kind: str, value_bytes: int) -> str:
    slug = kind.replace(" ", "_").replace("/", "-").replace(",", "")
    path = os.path.join(directory, f"{slug}-{value_bytes}.tsv")
    if not os.path.exists(path):
        with open(path, "w") as f:
            for method, target, body in request_lines(kind, value_bytes):
                f.write(f"{method}\t{target}\t{body}\n")
    return path
