"""
When answers are sent (dache.web.channel.Outbox): a connection answered
alone goes at once; the others answered in the same reactor turn wait for
its end and then go out together, never past the output bound, never after
the connection's close, never behind a 100 Continue.
"""

from __future__ import annotations

import time

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from dache.testing import MemoryNode
from dache.web.site import DacheSite
from tests.test_hot_path import TCPPair

GET = b"GET /dache/k HTTP/1.1\r\nHost: d\r\n\r\n"
ANSWER = b'\r\n\r\n{"key":"k","value":"v"}'


def _site(**settings) -> DacheSite:
    node = MemoryNode()
    node.cache.set("k", b'"v"')
    node.cache.set("big", b'"' + b"x" * 5000 + b'"')
    return DacheSite(node.api.resource(), **settings)


@pytest_twisted.inlineCallbacks
def _received_within(pair: TCPPair, ending: bytes, seconds: float = 5.0):
    """What the client reads by the time it ends with `ending`, the reactor running."""
    received = b""
    deadline = time.monotonic() + seconds
    while not received.endswith(ending):
        assert time.monotonic() < deadline, received
        yield deferLater(reactor, 0.001, lambda: None)
        received += pair.received_now()
    return received


@pytest_twisted.inlineCallbacks
def test_a_second_connection_of_the_turn_is_answered_at_its_end():
    site = _site()
    first, second = TCPPair(site), TCPPair(site)
    try:
        first.channel.dataReceived(GET)
        second.channel.dataReceived(GET)
        assert first.received_now().endswith(ANSWER)  # the first one: at once
        assert second.received_now() == b""  # waits for the end of the turn
        received = yield _received_within(second, ANSWER)
        assert received.count(b"HTTP/1.1 200 OK") == 1
        # A new turn: whichever connection is answered first goes at once again.
        second.channel.dataReceived(GET)
        assert second.received_now().endswith(ANSWER)
    finally:
        first.close()
        second.close()


@pytest_twisted.inlineCallbacks
def test_answers_waiting_on_one_connection_go_in_order_and_past_the_bound_at_once():
    site = _site(output_buffer_bytes=4096)
    first, second = TCPPair(site), TCPPair(site)
    try:
        first.channel.dataReceived(GET)
        second.channel.dataReceived(GET)
        second.channel.dataReceived(b"GET /dache/big HTTP/1.1\r\nHost: d\r\n\r\n")
        # Over the connection's output bound: sent now, the small answer first.
        now = second.received_now()
        assert now.count(b"HTTP/1.1 200 OK") == 2
        assert now.index(ANSWER) < now.index(b'"big"')
        second.channel.dataReceived(GET)  # under the bound again: waits
        assert second.received_now() == b""
        yield _received_within(second, ANSWER)
    finally:
        first.close()
        second.close()


def test_an_answer_waiting_goes_out_before_its_connection_closes():
    site = _site()
    first, second = TCPPair(site), TCPPair(site)
    try:
        first.channel.dataReceived(GET)
        second.channel.dataReceived(
            b"GET /dache/k HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n"
        )
        assert second.transport.disconnecting
        received = second.received_now()
        assert received.endswith(ANSWER)
        assert b"Connection: close" in received
    finally:
        first.close()
        second.close()


@pytest_twisted.inlineCallbacks
def test_an_answer_waiting_goes_out_before_a_100_continue():
    site = _site()
    first, second = TCPPair(site), TCPPair(site)
    try:
        first.channel.dataReceived(GET)
        second.channel.dataReceived(GET)
        second.channel.dataReceived(
            b"POST /dache/k HTTP/1.1\r\nHost: d\r\nContent-Length: 11\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        received = yield _received_within(second, b"HTTP/1.1 100 Continue\r\n\r\n")
        assert received.index(ANSWER) < received.index(b"100 Continue")
        second.channel.dataReceived(b'{"value":1}')
        received = yield _received_within(second, b"\r\n\r\n")
        assert received.startswith(b"HTTP/1.1 204 No Content")
    finally:
        first.close()
        second.close()


def test_a_lost_connection_stops_being_answered_at_once():
    site = _site()
    first, second = TCPPair(site), TCPPair(site)
    try:
        first.channel.dataReceived(GET)
        assert site.outbox.direct is first.channel
        first.close()
        assert site.outbox.direct is None
        second.channel.dataReceived(GET)  # now the first answered: at once
        assert second.received_now().endswith(ANSWER)
    finally:
        second.close()


@pytest_twisted.inlineCallbacks
def test_after_a_crowded_turn_every_answer_waits_until_a_turn_has_one_connection():
    site = _site()
    pairs = [TCPPair(site) for _ in range(3)]
    first, second, third = pairs
    try:
        for pair in pairs:
            pair.channel.dataReceived(GET)
        assert first.received_now().endswith(ANSWER)
        yield _received_within(second, ANSWER)
        yield _received_within(third, ANSWER)
        # Crowded: two connections waited last turn, so now even the first waits.
        first.channel.dataReceived(GET)
        second.channel.dataReceived(GET)
        assert first.received_now() == b"" and second.received_now() == b""
        yield _received_within(first, ANSWER)
        yield _received_within(second, ANSWER)
        first.channel.dataReceived(GET)  # still crowded last turn: waits
        assert first.received_now() == b""
        yield _received_within(first, ANSWER)
        # That turn held one connection's answer: the next one goes at once again.
        first.channel.dataReceived(GET)
        assert first.received_now().endswith(ANSWER)
    finally:
        for pair in pairs:
            pair.close()
