"""
Slow and idle clients cannot hold the server (dache/channel.py): an idle
connection is closed after IDLE_TIMEOUT, and a client that has not sent a whole
request REQUEST_TIMEOUT after its first byte gets 408 and is closed, even if it
keeps trickling bytes (which restarts the idle timeout every time).

The channel's clocks run on a task.Clock; one subprocess test shows the same
with real sockets: many idle connections and a trickling one, while the
server keeps answering others.
"""

from __future__ import annotations

import json
import selectors
import socket
import time

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from dache.testing import MemoryNode
from dache.web.site import DacheSite

IDLE = 10.0
REQUEST = 3.0
SLOW_POST = b"POST /dache/k HTTP/1.1\r\nHost: dache\r\nContent-Length: 20\r\n\r\n"
GET = b"GET /dache/k HTTP/1.1\r\nHost: dache\r\n\r\n"


def connect(clock: Clock) -> StringTransport:
    node = MemoryNode(clock=clock)
    site = DacheSite(node.api.resource(), timeout=IDLE, request_timeout=REQUEST, reactor=clock)
    address = IPv4Address("TCP", "127.0.0.1", 50000)
    channel = site.buildProtocol(address)
    transport = StringTransport(peerAddress=address)
    channel.makeConnection(transport)
    transport.protocol = channel
    return transport


def send(transport: StringTransport, data: bytes) -> None:
    transport.protocol.dataReceived(data)


def test_a_client_trickling_a_request_gets_408_once_request_timeout_passes():
    clock = Clock()
    transport = connect(clock)
    trickle = iter(SLOW_POST)
    send(transport, bytes([next(trickle)]))  # the deadline starts at the first byte
    while clock.seconds() < REQUEST - 0.2:
        clock.advance(0.1)  # far inside IDLE: the idle timeout alone never fires
        send(transport, bytes([next(trickle)]))
    assert not transport.disconnecting
    clock.advance(REQUEST - clock.seconds())
    assert transport.disconnecting
    response = transport.value()
    assert response.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b"Connection: close" in response
    body = response.partition(b"\r\n\r\n")[2]
    assert "not received within 3s" in json.loads(body)["error"]


def test_a_request_sent_in_time_is_answered_and_its_deadline_goes_with_it():
    clock = Clock()
    transport = connect(clock)
    send(transport, GET[:5])
    clock.advance(REQUEST - 0.1)
    send(transport, GET[5:])
    assert transport.value().startswith(b"HTTP/1.1 404 ")
    # Past the request deadline, but inside the idle timeout: still open.
    clock.advance(IDLE - 0.1)
    assert not transport.disconnecting
    # Then the idle timeout closes it, with no 408.
    clock.advance(0.2)
    assert transport.disconnecting
    assert b" 408 " not in transport.value()


def test_each_request_on_a_kept_alive_connection_gets_its_own_deadline():
    clock = Clock()
    transport = connect(clock)
    for _ in range(3):
        send(transport, GET)
        clock.advance(REQUEST + 1)  # idle between requests is not a slow request
    assert transport.value().count(b"HTTP/1.1 404 ") == 3
    assert not transport.disconnecting
    send(transport, SLOW_POST)  # headers, then no body
    clock.advance(REQUEST)
    assert transport.disconnecting
    assert transport.value().endswith(b'not received within 3s"}')


def test_an_idle_connection_is_closed_after_idle_timeout():
    clock = Clock()
    transport = connect(clock)
    clock.advance(IDLE - 0.1)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting
    assert transport.value() == b""


# -- a real server


IDLE_CONNECTIONS = 200


def test_many_idle_connections_and_a_trickler_do_not_stop_the_server(dache_process):
    node = dache_process(env={"IDLE_TIMEOUT": "2", "REQUEST_TIMEOUT": "2"})
    idle = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(IDLE_CONNECTIONS)]
    trickler = socket.create_connection(("127.0.0.1", node.port))
    trickler.sendall(b"POST /dache/t HTTP/1.1\r\nHost: dache\r\nContent-Length: 1000\r\n\r\n")

    # With all of them open, others are still served.
    assert node.set("k", 1) == 204
    assert node.get("k") == (200, {"key": "k", "value": 1})

    selector = selectors.DefaultSelector()
    for sock in [*idle, trickler]:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    open_idle, trickled, answer = set(idle), 0, b""
    deadline = time.monotonic() + 20
    while (open_idle or trickler.fileno() >= 0) and time.monotonic() < deadline:
        if trickler.fileno() >= 0:
            try:
                trickler.send(b" ")  # a byte every 0.2s: never idle for 2s
                trickled += 1
            except OSError:
                pass  # closed by the server; its answer is still to be read
        for key, _ in selector.select(timeout=0.2):
            sock = key.fileobj
            try:
                data = sock.recv(4096)
            except ConnectionResetError:
                data = b""
            if sock is trickler:
                answer += data
            if not data:
                selector.unregister(sock)
                open_idle.discard(sock)
                sock.close()
    assert not open_idle, f"{len(open_idle)} idle connections were never closed"
    assert trickler.fileno() < 0, "the trickling client was never dropped"
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert trickled < 1000  # dropped while it was still sending its body

    # And the server carries on.
    assert node.get("k") == (200, {"key": "k", "value": 1})
