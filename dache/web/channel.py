"""
The HTTP connection: a deadline for receiving each request, timers kept per
connection rather than per request, and answers sent at once.

Twisted's idle timeout (the Site's `timeout`, IDLE_TIMEOUT) restarts on every
byte received, so a client that trickles a header line or a body one byte at
a time holds its connection -- and a slot of the server's -- for as long as it
likes. DacheChannel adds a second clock: from the first byte of a request to
the last byte of its body, a client has REQUEST_TIMEOUT seconds; past that it
gets 408 and the connection is closed. Between requests only the idle timeout
applies, and while dache works on a request neither does (a write is bounded
by WRITE_TIMEOUT instead).

Answers sent by the channel: a Twisted transport never writes to its socket
when it is asked to; it buffers, registers for writability (an epoll_ctl),
waits for the reactor's next turn to send, then unregisters (another
epoll_ctl). For a small answer on a socket with nothing buffered that is
about a tenth of a request's CPU. So the channel holds the status line and
headers until the body (or the end of the response) and sends them together
itself, on a plain TCP socket: whatever the socket does not take, and every
other case (TLS, a backlog), goes through the transport as before, in order.

When: a connection alone on the server has its answers sent at once. Once
more than one connection is answered in a reactor turn, the others' answers
wait in the Outbox for the end of the turn and go out back to back, and so
do all of them in the turns that follow, until a turn has one connection
answered again: every send to a peer asleep in epoll_wait costs the sender
a wake-up of that peer (on loopback, under wrk at 64 connections, a sixth of
a GET's CPU), and sends back to back find it awake. What waits is bounded by
the transport's bufferSize (OUTPUT_BUFFER_BYTES) per connection, and is sent
before the connection is closed or a 100 Continue is.

Timers per connection: Twisted's idle timeout is cancelled when a request
comes in and made again when it is answered, and a request deadline would be
one more timer per request; each is a DelayedCall and its cancel, a few per
cent of a GET. Here each connection keeps one timer of each kind, moved
rather than remade, and checks on firing whether it still applies.
"""

from __future__ import annotations

import sys
from time import perf_counter
from typing import Any

from twisted.logger import Logger
from twisted.web.http import HTTPChannel

from dache.web import twisted_private
from dache.web.answer import error, finish

# Lingering close (as nginx's lingering_close): after refusing a body from its
# Content-Length, read and drop what the client still sends for at most this
# long and this much, so it can finish sending and read its 413.
LINGER_SECONDS = 5.0
LINGER_BYTES = 128 * 1024 * 1024
# What int()'s ValueError says past the interpreter's digit limit.
_DIGIT_LIMIT = "integer string conversion"
# RFC 9110's reason phrases, where Twisted's table has older ones.
REASONS = {
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
}


def _cancel(call: Any) -> None:
    """Cancel a timer if it is still pending; None, to store in its place."""
    if call is not None and call.active():
        call.cancel()


class Outbox:
    """
    The answers of one reactor turn that wait for its end (see the top of this
    module): every connection's but the one answered first, which is sent at
    once -- unless the last turn that held answers held more than one
    connection's (crowded): then that one's wait too. One per site.
    """

    def __init__(self) -> None:
        self.direct: Any = None  # the channel whose answers go at once
        self.crowded = False  # the last turn that held answers held several connections'
        self.waiting: list[Any] = []  # channels holding answers, in the order they came
        self._end_of_turn: Any = None  # IDelayedCall

    def may_send_now(self, channel: Any) -> bool:
        """Whether `channel`'s answer goes at once: the first connection answered this turn."""
        direct = self.direct
        if direct is None and not self.crowded:
            self.direct = channel
            return True
        return direct is channel

    def hold(self, channel: Any) -> None:
        """`channel` holds an answer: send it at the end of this turn."""
        self.waiting.append(channel)
        if self._end_of_turn is None:
            # callLater(0): run as the reactor's turn ends (runUntilCurrent), after
            # every read of the turn has been handled; the transport's reactor,
            # the one the socket is served by.
            self._end_of_turn = channel.transport.reactor.callLater(0, self.send_all)

    def forget(self, channel: Any) -> None:
        if self.direct is channel:
            self.direct = None

    def send_all(self) -> None:
        self._end_of_turn = None
        self.direct = None
        waiting, self.waiting = self.waiting, []
        self.crowded = len(waiting) > 1
        for channel in waiting:
            try:
                channel.send_held_output()
            except Exception:
                channel.log.failure("could not send an answer")
                channel.transport.abortConnection()


class DacheChannel(twisted_private.ProtocolRefusals, HTTPChannel):
    """
    An HTTP/1.1 channel that drops clients too slow to send a request, and
    sends each answer straight to the socket when it can.
    """

    site: Any  # set by Site.buildProtocol
    # The request deadline's timer: the request's start time is noted, and the
    # timer, when it fires, checks it and re-arms or lapses.
    _deadline: Any = None  # IDelayedCall, or None
    _request_began: float | None = None  # first byte of the request being received
    _host: Any = None
    _peer: Any = None
    _idle: Any = None  # IDelayedCall of the idle timeout, or None
    _head: list[bytes] | None = None  # status line and headers not sent yet
    _outbox: Outbox | None = None  # on a plain TCP socket: when answers are sent
    _held: list[bytes] | None = None  # answers waiting in the Outbox for the turn's end
    _held_bytes = 0
    _answered: Any = None  # a request answered while the client was not reading
    _send_deadline: Any = None  # IDelayedCall: SEND_TIMEOUT while over the output bound
    refused = False  # over MAX_CONNECTIONS: every request gets 503, then close
    _refusal: Any = None  # the Request answering a refusal of the protocol layer
    _lingering: Any = None  # IDelayedCall ending a lingering close
    _lingered = 0  # bytes read and dropped while lingering
    log = Logger()

    # -- answers sent at once

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        # Twisted's writeHeaders, kept back to go out with the body.
        head = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                head.extend((name, b": ", value, b"\r\n"))
        head.append(b"\r\n")
        self._head = head

    def write(self, data: bytes) -> None:
        head = self._head
        if head is not None:
            self._head = None
            head.append(data)
            data = b"".join(head)
        self._send(data)

    def writeSequence(self, iovec: list[bytes]) -> None:
        self.write(b"".join(iovec))

    def send_held(self) -> None:
        """Send headers still held (an answer without a body); the request calls it."""
        if self._head is not None:
            self.write(b"")

    def write_through(self, data: bytes) -> None:
        """
        Send `data` to the socket now, past the Outbox (the fan-out: it writes
        to many connections back to back already, and its pacing must see what
        the sends cost), unless headers or answers of this connection are
        still waiting: those go first, so this goes after them.
        """
        if self._head is not None or self._held is not None:
            self.write(data)
        else:
            self._send_now(data)

    def _send(self, data: bytes) -> None:
        outbox = self._outbox
        if outbox is None:  # not a plain TCP socket: through the transport, in order
            self._send_now(data)
            return
        held = self._held
        if held is None:
            if outbox.may_send_now(self):
                self._send_now(data)
                return
            held = self._held = []
            self._held_bytes = 0
            outbox.hold(self)
        held.append(data)
        self._held_bytes += len(data)
        if self._held_bytes > self.transport.bufferSize:
            self.send_held_output()  # over the output bound: the transport's to pause us

    def send_held_output(self) -> None:
        """Send what waits in the Outbox for this connection (the Outbox calls it)."""
        held = self._held
        if held is not None:
            self._held = None
            self._send_now(held[0] if len(held) == 1 else b"".join(held))

    def _send_now(self, data: bytes) -> None:
        data = twisted_private.send_now(self.transport, data)
        if data:
            self.transport.write(data)

    def loseConnection(self) -> None:
        self.send_held_output()  # an answer waiting in the Outbox goes first
        super().loseConnection()

    # -- refusals of the protocol layer, answered through a Request

    def refuse(self, status: int, message: str, linger: bool = False) -> None:
        """
        Answer `status {"error": message}` to a request the protocol layer
        refuses (malformed, too long, too slow, too large), through a Request
        of its own so the access log and the metrics count it, then close.
        With `linger`, keep reading (and dropping) what the client sends for
        a while first: a client still sending a body gets its answer.
        """
        if self._refusal is not None or self.transport is None or self.transport.disconnecting:
            return
        self.persistent = False
        request = self._refusal = self.requestFactory(self)
        request.method = b"-"  # the request line may not have been read
        request.uri = request.path = b"-"
        request.clientproto = b"HTTP/1.1"
        request.received_at = perf_counter()
        body = error(request, status, message)
        request.setResponseCode(status, REASONS.get(status))
        request.setHeader(b"connection", b"close")
        if linger:
            self._lingering = self.callLater(LINGER_SECONDS, self._end_lingering)
        finish(request, body)

    def lineLengthExceeded(self, line: bytes) -> None:
        # LineReceiver's limit (MAX_LENGTH) on one line: the request line if
        # no request has begun, else a header line.
        if not self.requests:
            self.refuse(414, f"the request line is over {self.MAX_LENGTH} bytes")
        else:
            self.refuse(431, f"a header line is over {self.MAX_LENGTH} bytes")

    def _linger(self, data: bytes) -> None:
        self._lingered += len(data)
        if self._lingered > LINGER_BYTES:
            self._end_lingering()

    def _end_lingering(self) -> None:
        self._lingering = _cancel(self._lingering)
        self.send_held_output()
        self.transport.loseConnection()

    # -- bounded per connection

    def connectionMade(self) -> None:
        site = self.site
        if site.over_connection_limit():
            self.refused = True
        site.open_connections += 1
        super().connectionMade()
        # Unsent output past this many bytes makes the transport pause us
        # (twisted.internet.abstract.FileDescriptor.bufferSize).
        self.transport.bufferSize = site.output_buffer_bytes
        twisted_private.set_pipeline_bound(self, site.pipeline_buffer_bytes)
        if twisted_private.plain_tcp(self.transport):
            self._outbox = site.outbox

    def allHeadersReceived(self) -> None:
        # HTTPChannel may answer "100 Continue" here, straight to the transport:
        # an answer still waiting in the Outbox must go before it.
        if self._held is not None:
            self.send_held_output()
        super().allHeadersReceived()

    def requestDone(self, request: Any) -> None:
        if request is self._refusal:
            self.send_held_output()
            half_close = getattr(self.transport, "loseWriteConnection", None)
            if self._lingering is not None and half_close is not None:
                half_close()  # the answer is out: say so with a FIN, read until done
            else:
                self._end_lingering()
            return
        # Twisted's HTTPChannel goes on to the next pipelined request even when
        # its transport has asked it to pause, so a client that sends requests
        # and never reads the answers has every answer buffered in memory.
        # Here the next request waits until the client has taken the output
        # (resumeProducing), and nothing more is read from it meanwhile.
        if twisted_private.waiting_for_transport(self) and self.persistent:
            self._answered = request
            twisted_private.stop_reading(self)
            if self._send_deadline is None:
                self._send_deadline = self.callLater(self.site.send_timeout, self._send_too_slow)
            return
        super().requestDone(request)

    def resumeProducing(self) -> None:
        super().resumeProducing()
        request, self._answered = self._answered, None
        if request is not None:
            self._cancel_send_deadline()
            super().requestDone(request)  # reads and parses what was held back

    def _cancel_send_deadline(self) -> None:
        self._send_deadline = _cancel(self._send_deadline)

    def _send_too_slow(self) -> None:
        self._send_deadline = None
        self.log.info(
            "closing a connection that has not read its answers for {seconds:g}s",
            seconds=self.site.send_timeout,
        )
        self.transport.abortConnection()  # a client that does not read cannot take a close

    def dataReceived(self, data: bytes) -> None:
        if self._refusal is not None:
            if self._lingering is not None:
                self._linger(data)
            return  # answered and closing: nothing more is parsed
        if self._request_began is None and not self._handlingRequest and data:
            timeout = self.site.request_timeout
            if timeout is not None:
                self._request_began = self.site.reactor.seconds()
                if self._deadline is None:
                    self._deadline = self.callLater(timeout, self._check_deadline)
        try:
            super().dataReceived(data)
        except ValueError as e:
            # twisted.web int()s a Content-Length once it has checked it is all
            # digits; past the interpreter's limit (sys.get_int_max_str_digits(),
            # 4,300) that raises out of its parser: no answer, a traceback logged.
            # (A request is parsed only once the one before it is answered.)
            if _DIGIT_LIMIT not in str(e):
                raise
            self.refuse(
                400,
                f"malformed request: a Content-Length of over {sys.get_int_max_str_digits()} "
                "digits",
            )

    def allContentReceived(self) -> None:
        self._request_began = None
        super().allContentReceived()

    def getHost(self) -> Any:
        # twisted.web asks on every request (a getsockname() system call);
        # a connection's addresses never change.
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def getPeer(self) -> Any:
        if self._peer is None:
            self._peer = super().getPeer()
        return self._peer

    # -- the idle timeout, one timer per connection

    def setTimeout(self, period: float | None) -> float | None:
        # Twisted's TimeoutMixin cancels the idle timer when a request comes in
        # and makes a new one when it is answered: two timer operations per
        # request. Here the timer stays; a period of None (a request is being
        # handled) only makes it lapse if it fires, and a new period moves it.
        previous, self.timeOut = self.timeOut, period
        if period is not None:
            if self._idle is None:
                self._idle = self.callLater(period, self._idle_expired)
            else:
                self._idle.reset(period)
        return previous

    def resetTimeout(self) -> None:
        if self._idle is not None and self.timeOut is not None:
            self._idle.reset(self.timeOut)

    def _idle_expired(self) -> None:
        self._idle = None
        if self.timeOut is not None:  # None: a request is being handled
            self.timeoutConnection()

    def connectionLost(self, reason: Any) -> None:
        self.site.open_connections -= 1
        self._held = None
        if self._outbox is not None:
            self._outbox.forget(self)
        self._cancel_deadline()
        self._cancel_send_deadline()
        self._answered = None
        self._lingering = _cancel(self._lingering)
        super().connectionLost(reason)
        self._idle = _cancel(self._idle)

    def _cancel_deadline(self) -> None:
        self._deadline = _cancel(self._deadline)

    def _check_deadline(self) -> None:
        self._deadline = None
        if self._request_began is None:
            return  # between requests: the next one arms the timer again
        timeout = self.site.request_timeout
        remaining = self._request_began + timeout - self.site.reactor.seconds()
        if remaining > 0:  # a later request than the one that armed the timer
            self._deadline = self.callLater(remaining, self._check_deadline)
            return
        self._request_too_slow()

    def _request_too_slow(self) -> None:
        seconds = self.site.request_timeout
        self.refuse(408, f"the request was not received within {seconds:g}s")
        # And abort if the client will not take the close (logged as the idle
        # timeout is).
        # Close as the idle timeout does (and log it the same way): politely,
        # then abort if the client will not take the close.
        self.timeoutConnection()
