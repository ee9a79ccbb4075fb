"""
The fan-out (dache.web.fanout): its writes (DacheChannel.write_through) on
real TCP sockets -- a flush puts every watcher's events on its socket before
it returns (so its pacing times the sends, not only their queueing in the
Outbox), never ahead of what the connection still holds back -- and its
pacing on a task.Clock: how long the next flush waits after one that took T,
by how busy the node was meanwhile.
"""

from __future__ import annotations

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from dache.testing import MemoryNode
from dache.web.fanout import PACE, PACE_IDLE, PACE_MAX
from dache.web.site import DacheSite
from tests.test_hot_path import TCPPair
from tests.test_watch import Client, watch_request, write

GET = b"GET /dache/k HTTP/1.1\r\nHost: d\r\n\r\n"
WATCH = b"GET /dache?watch=true HTTP/1.1\r\nHost: d\r\n\r\n"


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
        revision = write(node, "a")
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


# -- pacing: how long a flush waits after the last, on a task.Clock


class _Flushes:
    """A fake CPU clock: each flush takes `took` of CPU; the writers take `between` before it."""

    def __init__(self) -> None:
        self.now = 0.0
        self.in_flush = False
        self.took = 0.0

    def cpu_time(self) -> float:
        if self.in_flush:  # the flush's end
            self.now += self.took
        self.in_flush = not self.in_flush
        return self.now


def _paced_node(took: float):
    node = MemoryNode()
    client = Client(node, watch_request())
    cpu = _Flushes()
    cpu.took = took
    node.watchers.fanouts.cpu_time = cpu.cpu_time
    return node, client, cpu


def _keys(client: Client) -> list[str]:
    return [e["data"]["key"] for e in client.events()]


def test_on_a_node_busy_while_the_fan_out_waited_a_flush_of_t_delays_the_next_by_pace_t():
    node, client, cpu = _paced_node(took=0.004)
    write(node, "a")
    node.clock.advance(0)  # the first flush: 4 ms of CPU
    node.clock.advance(0.1)
    cpu.now += 0.1  # the writers used every moment of the wait
    write(node, "b")
    node.clock.advance(0)  # waited long enough already: flushed now, busy 1
    assert _keys(client) == ["a", "b"]
    write(node, "c")
    node.clock.advance(PACE * 0.004 - 0.0005)
    assert _keys(client) == ["a", "b"]  # paced as much as a busy node is
    node.clock.advance(0.001)
    assert _keys(client) == ["a", "b", "c"]


def test_on_a_node_idle_while_the_fan_out_waited_a_flush_of_t_delays_the_next_by_pace_idle_t():
    node, client, cpu = _paced_node(took=0.004)
    write(node, "a")
    node.clock.advance(0)
    node.clock.advance(0.1)  # and no CPU used meanwhile: nobody else wants the node
    write(node, "b")
    node.clock.advance(0)
    write(node, "c")
    node.clock.advance(PACE_IDLE * 0.004 - 0.0005)
    assert _keys(client) == ["a", "b"]  # still paced, by less
    node.clock.advance(0.001)
    assert _keys(client) == ["a", "b", "c"]


def test_half_busy_paces_halfway_and_never_past_pace_max():
    node, client, cpu = _paced_node(took=0.004)
    write(node, "a")
    node.clock.advance(0)
    node.clock.advance(0.1)
    cpu.now += 0.05  # the writers used half the wait
    write(node, "b")
    node.clock.advance(0)
    write(node, "c")
    halfway = (PACE_IDLE + PACE) / 2 * 0.004
    node.clock.advance(halfway - 0.0005)
    assert _keys(client) == ["a", "b"]
    node.clock.advance(0.001)
    assert _keys(client) == ["a", "b", "c"]
    cpu.took = 1.0  # a very long flush, on a busy node: still at most PACE_MAX
    node.clock.advance(0.1)
    cpu.now += 0.1
    write(node, "d")
    node.clock.advance(0)
    write(node, "e")
    node.clock.advance(PACE_MAX)
    assert _keys(client)[-1] == "e"
