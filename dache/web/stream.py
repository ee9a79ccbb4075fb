"""
A streaming answer (Server-Sent Events, a long poll's body): what
DacheRequest.begin_stream() returns.

A stream is exempt from IDLE_TIMEOUT and REQUEST_TIMEOUT (the request has been
received; the answer is the one that takes long) and from SEND_TIMEOUT, and
has its own bound instead: it registers as the request's streaming producer,
so when the client stops reading and the transport's buffer fills, the
transport pauses it; what is written meanwhile waits here, and once more
than `buffer_bytes` wait, the client is too slow: the connection is closed
(a stream cannot skip what it has not sent).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer


@implementer(IPushProducer)
class Stream:
    log = Logger()

    def __init__(self, request: Any, buffer_bytes: int):
        self.request = request
        self.buffer_bytes = buffer_bytes
        self.paused = False
        self.closed = False
        self._waiting: list[bytes] = []
        self._waiting_bytes = 0
        # Fires (None) when the stream ends: closed here, by the client, or for its bound.
        self.done: Deferred[None] = request.notifyFinish()
        self.done.addBoth(self._ended)
        request.registerProducer(self, True)

    def write(self, data: bytes) -> bool:
        """Send `data` (or queue it while the client is not reading); False once closed."""
        if self.closed:
            return False
        if not self.paused:
            self.request.write(data)
            return True
        self._waiting.append(data)
        self._waiting_bytes += len(data)
        if self._waiting_bytes > self.buffer_bytes:
            self.log.info(
                "closing a stream whose client is not reading ({bytes} bytes waiting)",
                bytes=self._waiting_bytes,
            )
            self._abort()
            return False
        return True

    def close(self) -> None:
        """End the answer (the terminating chunk); the connection may be reused."""
        if self.closed:
            return
        self.closed = True
        self.request.unregisterProducer()
        for data in self._waiting:
            self.request.write(data)
        self._waiting = []
        self.request.finish()

    def _abort(self) -> None:
        self._let_go()
        transport = getattr(self.request.channel, "transport", None)
        if transport is not None:
            transport.abortConnection()

    def _ended(self, result: Any) -> None:
        self._let_go()
        return None  # a client that went away is the normal end of a stream

    def _let_go(self) -> None:
        self.closed = True
        self._waiting = []
        self._waiting_bytes = 0

    @property
    def waiting_bytes(self) -> int:
        """Bytes written while the client was not reading, not sent yet."""
        return self._waiting_bytes

    # -- IPushProducer: the transport's buffer is full / has drained

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        while self._waiting and not self.paused and not self.closed:
            data = self._waiting.pop(0)
            self._waiting_bytes -= len(data)
            self.request.write(data)  # may pause us again: the rest waits

    def stopProducing(self) -> None:
        self._let_go()
