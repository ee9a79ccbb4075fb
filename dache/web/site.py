"""
dache's twisted.web Site: request size limits enforced before a body is read,
and optional access logging with key redaction.
"""

from __future__ import annotations

from io import BytesIO
from time import perf_counter, time
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import datetimeToString
from twisted.web.resource import _IEncodingResource
from twisted.web.server import Request, Site, version

from dache.web.api import KEY_PREFIX, error_body
from dache.web.channel import DacheChannel

if TYPE_CHECKING:
    from dache.web.metrics import Metrics


def _too_large_response(limit: int) -> bytes:
    body = error_body(f"body is over the {limit}-byte limit")
    return (
        b"HTTP/1.1 413 Content Too Large\r\n"
        b"Content-Type: application/json\r\n"
        b"Connection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )


class _Discard:
    """A body sink for a refused request: drops what it is given."""

    def write(self, data: bytes) -> None:
        pass

    def seek(self, *args: Any) -> None:
        pass

    def read(self, *args: Any) -> bytes:
        return b""

    def close(self) -> None:
        pass


class _HTTPDate:
    """The Date header's value, formatted once a second rather than per request."""

    second = -1
    value = b""

    @classmethod
    def now(cls) -> bytes:
        second = int(time())
        if second != cls.second:
            cls.value = datetimeToString(second)
            cls.second = second
        return cls.value


class DacheRequest(Request):
    """
    A Request that refuses a body over the site's limit from its
    Content-Length, before reading it (or, for a chunked body, as soon as it
    grows past the limit), and keeps bodies in memory rather than temp files.
    """

    _refused = False
    _received = 0
    received_at = 0.0  # perf_counter() when the whole request was in: latency starts

    def gotLength(self, length: int | None) -> None:
        limit = self.channel.site.max_body_bytes
        if length is not None and length > limit:
            # Don't let the channel answer "100 Continue" to a body we refuse.
            self.requestHeaders.removeHeader(b"expect")
            self._refuse(limit)
            return
        self.content = BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        limit = self.channel.site.max_body_bytes
        if self._received > limit:
            self._refuse(limit)
            return
        self.content.write(data)

    def _refuse(self, limit: int) -> None:
        self._refused = True
        self.content = _Discard()
        transport = self.channel.transport
        transport.write(_too_large_response(limit))
        transport.loseConnection()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return  # already answered 413; the connection is closing
        self.received_at = perf_counter()
        super().requestReceived(command, path, version)

    def process(self) -> None:
        # twisted.web.server.Request.process, with the Date header formatted
        # once a second (formatting it costs ~3% of a GET).
        self.site = self.channel.site
        self.setHeader(b"Server", version)
        self.setHeader(b"Date", _HTTPDate.now())
        self.prepath = []
        self.postpath = [unquote_to_bytes(p) for p in self.path[1:].split(b"/")]
        if self.path == b"*":
            self._handleStar()
            return
        try:
            resource = self.site.getResourceFor(self)
            if _IEncodingResource.providedBy(resource):
                encoder = resource.getEncoder(self)
                if encoder is not None:
                    self._encoder = encoder
            self.render(resource)
        except BaseException:
            self.processingFailed(Failure())

    streaming = False  # a long-lived response (dache.web.watch), see begin_stream

    def begin_stream(self) -> None:
        """
        This response is a stream: it stays open and is written to over time.
        (Twisted's idle and request timeouts are already off while a request is
        being answered; the edge's per-connection output bound exempts it.)
        """
        self.streaming = True

    def write(self, data: bytes) -> None:
        super().write(data)
        # The channel holds headers back to send them with the body (see
        # dache.web.channel); an answer without one (HEAD, 204, an empty first
        # write) sends them now.
        channel = getattr(self, "channel", None)
        if channel is not None:
            channel.send_held()


class DacheSite(Site):
    protocol = DacheChannel  # HTTP/1.1 with a per-request receive deadline
    requestFactory = DacheRequest
    noisy = False
    access_log = Logger(namespace="dache.access")

    def __init__(
        self,
        resource: Any,
        max_body_bytes: int = 1024 * 1024,
        access_log: bool = False,
        redact_keys: bool = False,
        timeout: float | None = Site.timeOut,
        metrics: Metrics | None = None,
        request_timeout: float | None = None,
        **kwargs: Any,
    ):
        # dache reads bodies as JSON, never as forms: don't let twisted.web
        # parse the Content-Type of every POST (email.headerregistry, ~60 us).
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(resource, timeout=timeout, **kwargs)
        self.request_timeout = request_timeout  # see dache.web.channel
        self.max_body_bytes = max_body_bytes
        self.log_requests = access_log
        self.redact_keys = redact_keys
        self.metrics = metrics

    def log(self, request: Request) -> None:
        # Called once per answered request: the one place metrics count requests.
        if self.metrics is not None:
            self.metrics.request_finished(
                request.method, request.path, request.code, perf_counter() - request.received_at
            )
        # Per-request logging costs about a third of throughput: off by default.
        if not self.log_requests:
            return
        path = request.uri
        if self.redact_keys and path.startswith(KEY_PREFIX):
            path = KEY_PREFIX + b"<redacted>"
        self.access_log.info(
            '{client} "{method} {path}" {code} {length}',
            client=request.getClientAddress().host
            if hasattr(request.getClientAddress(), "host")
            else "-",
            method=request.method.decode("ascii", "replace"),
            path=path.decode("utf-8", "replace"),
            code=request.code,
            length=request.sentLength,
        )
