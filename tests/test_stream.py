"""
DacheRequest.begin_stream() on a real socket: a stream outlives IDLE_TIMEOUT
while its client reads, and is closed once more than its bound waits for a
client that does not read.
"""

from __future__ import annotations

import socket

import pytest_twisted
from twisted.internet import reactor, task
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from dache.web.site import DacheSite

CHUNK = b"data: " + b"x" * 16384 + b"\n\n"


class Streaming(Resource):
    isLeaf = True

    def __init__(self, buffer_bytes: int):
        super().__init__()
        self.buffer_bytes = buffer_bytes
        self.streams = []

    def render(self, request):
        stream = request.begin_stream(buffer_bytes=self.buffer_bytes)
        self.streams.append(stream)
        self.feed = task.LoopingCall(self._write, stream)
        self.feed.start(0.005)
        return NOT_DONE_YET

    def _write(self, stream):
        if not stream.write(CHUNK):
            self.feed.stop()


def serve(resource, **site):
    port = reactor.listenTCP(0, DacheSite(resource, **site), interface="127.0.0.1")
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(("127.0.0.1", port.getHost().port))
    client.setblocking(False)
    client.send(b"GET /watch HTTP/1.1\r\nHost: dache\r\n\r\n")
    return port, client


def drain(client) -> int:
    received = 0
    while True:
        try:
            chunk = client.recv(1 << 20)
        except BlockingIOError:
            return received
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += len(chunk)


@pytest_twisted.inlineCallbacks
def test_a_stream_read_by_its_client_outlives_the_idle_timeout():
    resource = Streaming(buffer_bytes=1 << 20)
    port, client = serve(resource, timeout=0.3, request_timeout=0.3)
    try:
        received = 0
        for _ in range(40):  # 2 s: several idle and request timeouts
            yield task.deferLater(reactor, 0.05, lambda: None)
            received += drain(client)
        assert received > 40 * len(CHUNK) // 2
        assert not resource.streams[0].closed
        resource.streams[0].close()
        yield task.deferLater(reactor, 0.05, lambda: None)
    finally:
        client.close()
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_a_stream_whose_client_does_not_read_is_closed_at_its_bound():
    bound = 256 * 1024
    resource = Streaming(buffer_bytes=bound)
    port, client = serve(resource, send_timeout=600)  # the stream's own bound decides
    try:
        for _ in range(200):
            yield task.deferLater(reactor, 0.05, lambda: None)
            if resource.streams and resource.streams[0].closed:
                break
        stream = resource.streams[0]
        assert stream.closed
        assert stream.waiting_bytes == 0  # let go of what it held
        assert "closing a stream whose client is not reading" in "".join(_logged)
    finally:
        client.close()
        yield port.stopListening()


_logged: list[str] = []


def setup_module():
    from twisted.logger import formatEvent, globalLogPublisher

    globalLogPublisher.addObserver(lambda event: _logged.append(formatEvent(event)))
