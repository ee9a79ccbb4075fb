"""
One test per shortcut in dache/web/twisted_private.py: each fails if the
Twisted release in use no longer behaves the way the shortcut relies on.
"""

from __future__ import annotations

import inspect
import signal
import socket

import pytest_twisted
from twisted.application import app
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.testing import StringTransport
from twisted.web.http import HTTPChannel, Request
from twisted.web.test.requesthelper import DummyChannel

from dache.web import twisted_private


class _Keep(Protocol):
    def connectionMade(self):
        self.factory.connected.callback(self)


@pytest_twisted.inlineCallbacks
def test_send_now_writes_to_the_socket_of_an_idle_tcp_transport():
    factory = Factory.forProtocol(_Keep)
    factory.connected = Deferred()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    client = socket.create_connection(("127.0.0.1", port.getHost().port))
    try:
        server = yield factory.connected
        left = twisted_private.send_now(server.transport, b"hello")
        assert left == b""  # sent, not buffered: the client has it without a reactor turn
        client.settimeout(5)
        assert client.recv(5) == b"hello"
        server.transport.write(b"x" * 10)  # buffered now: send_now must not jump the queue
        assert twisted_private.send_now(server.transport, b"later") == b"later"
        assert server.transport.dataBuffer or server.transport._tempDataBuffer
    finally:
        client.close()
        server.transport.abortConnection()
        yield port.stopListening()


def test_send_now_leaves_other_transports_alone():
    assert twisted_private.send_now(StringTransport(), b"data") == b"data"


@pytest_twisted.inlineCallbacks
def test_plain_tcp_is_a_tcp_connection_without_tls_served_by_its_reactor():
    factory = Factory.forProtocol(_Keep)
    factory.connected = Deferred()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    client = socket.create_connection(("127.0.0.1", port.getHost().port))
    try:
        server = yield factory.connected
        assert twisted_private.plain_tcp(server.transport)
        assert server.transport.reactor is reactor  # the Outbox's end of turn is its
        assert not twisted_private.plain_tcp(StringTransport())
    finally:
        client.close()
        server.transport.abortConnection()
        yield port.stopListening()


def _channel() -> HTTPChannel:
    channel = HTTPChannel()
    channel.makeConnection(StringTransport())
    return channel


def test_waiting_for_transport_follows_the_transport_pausing_the_channel():
    channel = _channel()
    assert not twisted_private.waiting_for_transport(channel)
    channel.pauseProducing()  # what the transport calls when its buffer is full
    assert twisted_private.waiting_for_transport(channel)
    channel.resumeProducing()
    assert not twisted_private.waiting_for_transport(channel)


def test_stop_reading_pauses_the_transport():
    channel = _channel()
    twisted_private.stop_reading(channel)
    assert channel.transport.producerState == "paused"


def test_the_pipeline_bound_stops_reading_while_a_request_is_handled():
    channel = _channel()
    channel.requestFactory = _Held
    twisted_private.set_pipeline_bound(channel, 100)
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # being handled: held
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 2)
    assert channel.transport.producerState == "producing"  # under the bound
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 4)
    assert channel.transport.producerState == "paused"


class _Held(Request):
    def process(self):
        pass  # never answered: the channel keeps handling it


def test_client_gone_is_set_when_the_connection_is_lost():
    request = Request(DummyChannel())
    assert not twisted_private.client_gone(request)
    request.connectionLost(Exception("gone"))
    assert twisted_private.client_gone(request)


def test_set_header_is_what_set_header_stores_for_the_names_dache_sets():
    from dache.web.answer import CONTENT_LENGTH, CONTENT_TYPE, ETAG

    for name in (CONTENT_TYPE, CONTENT_LENGTH, ETAG, b"Server", b"Date"):
        shortcut, public = Request(DummyChannel()), Request(DummyChannel())
        twisted_private.set_header(shortcut, name, b"v")
        public.setHeader(name.lower(), b"v")
        assert list(shortcut.responseHeaders.getAllRawHeaders()) == [(name, [b"v"])]
        assert list(public.responseHeaders.getAllRawHeaders()) == [(name, [b"v"])]
        assert shortcut.responseHeaders.getRawHeaders(name.lower()) == [b"v"]
        public.setHeader(name, b"w")  # and the public API finds and replaces it
        twisted_private.set_header(shortcut, name, b"w")
        assert list(shortcut.responseHeaders.getAllRawHeaders()) == [(name, [b"w"])]


def test_header_values_finds_the_headers_as_the_channel_stored_them():
    channel = _channel()
    channel.requestFactory = _Held
    channel.dataReceived(
        b'POST / HTTP/1.1\r\nhost: x\r\nIF-MATCH: "1"\r\nif-none-match: *\r\n'
        b'if-none-match: "2"\r\ncontent-encoding: gzip\r\nContent-Length: 0\r\n\r\n'
    )
    request = channel.requests[0]
    for name in (b"Host", b"If-Match", b"If-None-Match", b"Content-Encoding"):
        values = twisted_private.header_values(request, name)
        assert values and values == request.requestHeaders.getRawHeaders(name.lower())
    assert twisted_private.header_values(request, b"If-None-Match")[-1] == request.getHeader(
        b"if-none-match"
    )
    assert twisted_private.header_values(request, b"Authorization") is None


def test_forget_exit_signal_clears_what_twistd_would_re_raise():
    other = SelectReactor()  # not the running one: its signal handler only records
    try:
        other.sigTerm(signal.SIGTERM, None)
        assert other._exitSignal == signal.SIGTERM
        twisted_private.forget_exit_signal(other)
        assert other._exitSignal is None
    finally:
        other.waker.connectionLost(None)
    # and twistd's runner still takes the signal to re-raise from there
    assert "reactor._exitSignal" in inspect.getsource(app.ApplicationRunner)


def test_write_some_data_is_a_send_on_the_connections_socket():
    # send_now calls transport.socket.send() in place of writeSomeData().
    source = inspect.getsource(twisted_private.Connection.writeSomeData)
    assert "self.socket.send" in source
    assert "EWOULDBLOCK" in source and "ENOBUFS" in source  # nothing sent, not lost


@pytest_twisted.inlineCallbacks
def test_send_now_returns_what_a_full_socket_did_not_take():
    factory = Factory.forProtocol(_Keep)
    factory.connected = Deferred()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    client = socket.create_connection(("127.0.0.1", port.getHost().port))
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        server = yield factory.connected
        server.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        data = b"x" * (4 << 20)
        left = twisted_private.send_now(server.transport, data)  # the client reads nothing
        assert 0 < len(left) < len(data)  # part taken, the rest handed back
        chunk = b"y" * 65536
        for _ in range(1000):  # until the socket takes nothing (EWOULDBLOCK)
            if twisted_private.send_now(server.transport, chunk) == chunk:
                break
        else:
            raise AssertionError("the socket never filled up")
    finally:
        client.close()
        server.transport.abortConnection()
        yield port.stopListening()
