"""
The one place dache reaches into Twisted's private state. Nothing else in
dache may touch an underscored Twisted attribute; each shortcut here names
what it relies on, and tests/test_twisted_private.py has a test per shortcut
that fails if the Twisted release in use stops behaving that way (setup.py
bounds Twisted to the tested range).

What each shortcut relies on:

- send_now(transport, data): twisted.internet.tcp.Connection keeps unsent
  output in `dataBuffer[offset:]` plus `_tempDataBuffer`, and its
  `writeSomeData(data)` is its non-blocking `socket`'s send() (an OSError
  meaning nothing was sent, or a connection the transport will find lost);
  send_now calls that send() itself. Used to send a small answer at once when
  nothing is buffered (saves two epoll_ctl calls and a reactor turn per
  answer), and by the fan-out for every watcher's chunk (calling send()
  itself saves 0.3-0.5 us of the ~5.5 us a loopback send takes).
- plain_tcp(transport): the transports send_now() applies to: that class,
  with `TLS` false; such a transport's `reactor` is the one serving it
  (dache.web.channel.Outbox ends its turn there).
- set_header(request, name, value): twisted.web's Headers keeps a header's
  values in `_rawHeaders[name]`, name in the canonical form its _nameEncoder
  gives (b"Content-Length", b"ETag"), and writes them out as they are. For
  the headers dache sets on every answer, from values it made itself (no
  CR or LF to sanitize): setHeader()'s encoding and sanitizing, five times
  an answer, cost a twentieth of a GET.
- header_values(request, name): the request's headers are in the same
  `_rawHeaders`, under the canonical name HTTPChannel stored them by
  (b"Host", b"If-Match"): getRawHeaders() without the name's encoding, for
  the headers every request is checked for.
- waiting_for_transport(channel): HTTPChannel sets `_waitingForTransport`
  while its transport has asked it to pause (unsent output over bufferSize).
- stop_reading(channel): HTTPChannel keeps the transport's push producer in
  `_networkProducer`; pausing it stops reading from the socket.
- set_pipeline_bound(channel, size): HTTPChannel buffers pipelined bytes
  received while it handles a request up to `_optimisticEagerReadSize`, then
  stops reading.
- client_gone(request): twisted.web.http.Request sets `_disconnected` when
  its connection is lost (the public notifyFinish() costs a Deferred per
  request on the hot path).
- ProtocolRefusals: HTTPChannel answers the requests its parser refuses
  (a malformed request line, header or Content-Length, bad chunked framing,
  too many or too large headers) from `_respondToBadRequestAndDisconnect()`
  with a bare 400 written to the transport; the mixin overrides it to answer
  through channel.refuse() instead, telling the header limits
  (`_receivedHeaderSize` > totalHeadersSize, `_receivedHeaderCount` >
  maxHeaders) apart as 431.
- forget_exit_signal(reactor): twistd re-raises the signal that stopped the
  reactor, kept in `reactor._exitSignal`, once the reactor has stopped.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.tcp import Connection

_SOCKET_SEND = Connection.writeSomeData


def plain_tcp(transport: Any) -> bool:
    """Whether send_now() may send on `transport`: a plain TCP socket, not TLS."""
    return getattr(type(transport), "writeSomeData", None) is _SOCKET_SEND and not transport.TLS


def send_now(transport: Any, data: bytes) -> bytes:
    """
    Send what the socket takes of `data` now if `transport` is plain TCP with
    nothing buffered; return what is left for transport.write().
    """
    if (
        getattr(type(transport), "writeSomeData", None) is _SOCKET_SEND  # plain TCP
        and transport.connected
        and not transport.disconnecting
        and not transport.TLS
        and not transport._tempDataBuffer
        and transport.offset == len(transport.dataBuffer)
    ):
        try:
            sent = transport.socket.send(data)  # writeSomeData, less two calls and a memoryview
        except OSError:  # EWOULDBLOCK, ENOBUFS or a lost connection: the transport will see
            return data
        return data[sent:] if sent else data
    return data


def set_header(request: Any, name: bytes, value: bytes) -> None:
    """request.setHeader(name, value), for a canonical `name` and a `value` without CR/LF."""
    request.responseHeaders._rawHeaders[name] = [value]


def header_values(request: Any, name: bytes) -> list[bytes] | None:
    """request.requestHeaders.getRawHeaders(name), for a canonical `name`."""
    return request.requestHeaders._rawHeaders.get(name)


def waiting_for_transport(channel: Any) -> bool:
    return channel._waitingForTransport


def stop_reading(channel: Any) -> None:
    channel._networkProducer.pauseProducing()


def set_pipeline_bound(channel: Any, size: int) -> None:
    channel._optimisticEagerReadSize = size


def client_gone(request: Any) -> bool:
    return request._disconnected


class ProtocolRefusals:
    """Mixin for an HTTPChannel with a refuse(status, message) method."""

    def _respondToBadRequestAndDisconnect(self) -> None:
        if (
            self._receivedHeaderSize > self.totalHeadersSize
            or self._receivedHeaderCount > self.maxHeaders
        ):
            self.refuse(431, "the request's header fields are over the limit")
        else:
            self.refuse(400, "malformed request: the request line, a header or the framing")


def forget_exit_signal(reactor: Any) -> None:
    if getattr(reactor, "_exitSignal", None) is not None:
        reactor._exitSignal = None
