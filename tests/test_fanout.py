"""
The fan-out's writes (dache.web.fanout, DacheChannel.write_through) on real
TCP sockets: a flush puts every watcher's events on its socket before it
returns (so its pacing times the sends, not only their queueing in the
Outbox), and never ahead of what the connection still holds back.
"""

from __future__ import annotations

import json

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from dache.engines import Change
from dache.testing import MemoryNode
from dache.web.site import DacheSite
from tests.test_hot_path import TCPPair

GET = b"GET /dache/k HTTP/1.1\r\nHost: d\r\n\r\n"
WATCH = b"GET /dache?watch=true HTTP/1.1\r\nHost: d\r\n\r\n"


def _write(node: MemoryNode, key: str) -> int:
    return node.committer.submit(Change.set(key, json.dumps(1).encode())).result


@pytest_twisted.inlineCallbacks
def test_a_flush_puts_every_watchers_events_on_its_socket_before_it_returns():
    node = MemoryNode()
    site = DacheSite(node.api.resource())
    pairs = [TCPPair(site) for _ in range(3)]
    try:
        for pair in pairs:
            pair.channel.dataReceived(WATCH)
        yield deferLater(reactor, 0.05, lambda: None)  # the Outbox sends the heads
        for pair in pairs:
            assert pair.received_now().startswith(b"HTTP/1.1 200 OK")
        revision = _write(node, "a")
        node.watchers.fanouts.flush()  # the reactor does not turn in between
        for pair in pairs:
            assert b"id: %d\nevent: set\n" % revision in pair.received_now()
    finally:
        for pair in pairs:
            pair.close()


@pytest_twisted.inlineCallbacks
def test_a_write_through_goes_after_what_its_connection_holds_in_the_outbox():
    node = MemoryNode()
    node.cache.set("k", b'"v"')
    site = DacheSite(node.api.resource())
    first, second = TCPPair(site), TCPPair(site)
    try:
        first.channel.dataReceived(GET)  # answered at once
        second.channel.dataReceived(GET)  # held for the end of the turn
        second.channel.write_through(b"after")
        assert second.received_now() == b""  # not ahead of the held answer
        received = b""
        for _ in range(100):
            yield deferLater(reactor, 0.01, lambda: None)
            received += second.received_now()
            if received.endswith(b"after"):
                break
        assert received.startswith(b"HTTP/1.1 200 OK")
        assert received.endswith(b'{"key":"k","value":"v"}after')
        first.received_now()
    finally:
        first.close()
        second.close()
