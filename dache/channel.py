"""
The HTTP connection, with a deadline for receiving each request.

Twisted's idle timeout (the Site's `timeout`, IDLE_TIMEOUT) restarts on every
byte received, so a client that trickles a header line or a body one byte at
a time holds its connection -- and a slot of the server's -- for as long as it
likes. DacheChannel adds a second clock: from the first byte of a request to
the last byte of its body, a client has REQUEST_TIMEOUT seconds; past that it
gets 408 and the connection is closed. Between requests only the idle timeout
applies, and while dache works on a request neither does (a write is bounded
by WRITE_TIMEOUT instead).
"""

from __future__ import annotations

from typing import Any

from twisted.web.http import HTTPChannel

from dache.cache import render_json


def _request_timeout_response(seconds: float) -> bytes:
    body = render_json({"error": f"the request was not received within {seconds:g}s"})
    return (
        b"HTTP/1.1 408 Request Timeout\r\n"
        b"Content-Type: application/json\r\n"
        b"Connection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )


class DacheChannel(HTTPChannel):
    """An HTTP/1.1 channel that drops clients too slow to send a request."""

    site: Any  # set by Site.buildProtocol
    _deadline: Any = None  # IDelayedCall while a request is being received
    _timed_out = False

    def dataReceived(self, data: bytes) -> None:
        if self._timed_out:
            return  # answered 408 and closing: ignore whatever still arrives
        if self._deadline is None and not self._handlingRequest and data:
            timeout = self.site.request_timeout
            if timeout is not None:
                self._deadline = self.callLater(timeout, self._request_too_slow)
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        self._cancel_deadline()
        super().allContentReceived()

    def connectionLost(self, reason: Any) -> None:
        self._cancel_deadline()
        super().connectionLost(reason)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _request_too_slow(self) -> None:
        self._deadline = None
        self._timed_out = True
        self.transport.write(_request_timeout_response(self.site.request_timeout))
        # Close as the idle timeout does (and log it the same way): politely,
        # then abort if the client will not take the close.
        self.timeoutConnection()
