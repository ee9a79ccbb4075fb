"""
Per-request CPU cost without sockets: dache's Site and the ceiling's, each
fed raw HTTP/1.1 requests through an in-memory transport, in one process.

    python -m bench.micro [--requests 20000] [--rounds 5]

This leaves out what both pay alike (system calls, the reactor's loop), so
it shows the cost of what dache adds -- and, unlike throughput on a shared
machine, it barely moves with the machine's load. Prints microseconds per
request (the best of the rounds) for each kind of request.
"""

from __future__ import annotations

import argparse
import gc
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from bench.ceiling import CeilingResource, CeilingSite, constant_body
from bench.scenarios import set_body
from dache.config import default_config
from dache.engines.memory import MemoryEngine
from dache.store.cache import Cache
from dache.store.committer import Committer
from dache.web.api import DacheAPI
from dache.web.auth import Access
from dache.web.site import DacheSite

ADDRESS = IPv4Address("TCP", "127.0.0.1", 40000)


def raw_request(method: str, path: str, body: str = "") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return (head + "\r\n" + body).encode()


def dache_site() -> Any:
    """Wired as dache.service does, with the default settings."""
    config = default_config()
    cache = Cache()
    committer = Committer(MemoryEngine(), cache, reactor, write_timeout=config.write_timeout)
    api = DacheAPI(
        cache,
        committer,
        reactor,
        max_key_bytes=config.max_key_bytes,
        max_value_bytes=config.max_value_bytes,
        access=Access.from_config(config),
    )
    cache.set("k", b'"' + b"x" * 98 + b'"')
    return DacheSite(
        api.resource(),
        max_body_bytes=config.max_value_bytes,
        timeout=config.idle_timeout,
        request_timeout=config.request_timeout,
    )


def ceiling_site() -> Any:
    return CeilingSite(CeilingResource(constant_body(100)), parsePOSTFormSubmission=False)


def per_request_us(site: Any, request: bytes, count: int, status: bytes = b"20") -> float:
    """
    Feed `count` copies of one request to one keep-alive connection. Timers go
    to the real reactor (not running), whose due and cancelled calls are
    processed as its loop would, every 256 requests.
    """
    channel = site.buildProtocol(ADDRESS)
    transport = StringTransport(hostAddress=ADDRESS, peerAddress=ADDRESS)
    channel.makeConnection(transport)
    data_received = channel.dataReceived
    began = time.process_time()
    for i in range(count):
        data_received(request)
        if i & 255 == 0:
            transport.clear()
            reactor.runUntilCurrent()
    transport.clear()
    data_received(request)
    elapsed = time.process_time() - began
    if not transport.value().startswith(b"HTTP/1.1 " + status):
        raise RuntimeError(f"unexpected answer: {transport.value()[:200]!r}")
    channel.connectionLost(None)
    return elapsed * 1e6 / count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    cases = [
        ("ceiling GET", ceiling_site(), raw_request("GET", "/dache/k"), b"200"),
        ("GET hit", dache_site(), raw_request("GET", "/dache/k"), b"200"),
        ("GET miss", dache_site(), raw_request("GET", "/dache/nope"), b"404"),
        ("ceiling POST", ceiling_site(), raw_request("POST", "/dache/k", set_body(100)), b"204"),
        ("SET memory", dache_site(), raw_request("POST", "/dache/k", set_body(100)), b"204"),
        ("DELETE", dache_site(), raw_request("DELETE", "/dache/k"), b"204"),
    ]
    gc.collect()
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, site, request, status in cases:
            cost = per_request_us(site, request, args.requests, status)
            best[name] = min(best.get(name, cost), cost)
    for name, cost in best.items():
        line = f"{name:14} {cost:7.2f} us/request"
        if not name.startswith("ceiling"):
            ceiling = best["ceiling POST" if name in ("SET memory", "DELETE") else "ceiling GET"]
            line += f"  ({ceiling / cost:.2f}x the ceiling's rate)"
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
