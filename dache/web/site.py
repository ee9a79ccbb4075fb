"""
dache's twisted.web Site: request size limits enforced before a body is read,
and optional access logging with key redaction.
"""

from __future__ import annotations

from io import BytesIO
from time import perf_counter, time
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import datetimeToString
from twisted.web.server import Request, Site, version

from dache.web import twisted_private
from dache.web.answer import error, finish
from dache.web.api import KEY_PREFIX
from dache.web.channel import DacheChannel, Outbox
from dache.web.stream import Stream

if TYPE_CHECKING:
    from dache.web.metrics import Metrics


_log = Logger()


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
        # Read and drop what the client still sends, so it gets to read the
        # 413 rather than a reset (dache.web.channel: lingering close).
        self.channel.refuse(413, f"body is over the {limit}-byte limit", linger=True)

    def parseCookies(self) -> None:
        pass  # dache reads no cookies (twisted.web looks for them on every request)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return  # already answered 413; the connection is closing
        self.received_at = perf_counter()
        super().requestReceived(command, path, version)

    def process(self) -> None:
        # Not twisted.web.server.Request.process: dache has one leaf resource
        # (dache.web.dispatch), so there is no traversal, and the Date header
        # is formatted once a second (formatting it costs ~3% of a GET).
        self.site = self.channel.site
        twisted_private.set_header(self, b"Server", version)
        twisted_private.set_header(self, b"Date", _HTTPDate.now())
        try:
            refusal = self._refusal()
            if refusal is not None:
                status, message = refusal
                finish(self, error(self, status, message))
                return
            self.render(self.site.resource)
        except BaseException:
            self.processingFailed(Failure())

    def _refusal(self) -> tuple[int, str] | None:
        """What is wrong with the request itself (RFC 9112), before any route."""
        if self.channel.refused:
            self.channel.persistent = False
            self.setHeader(b"retry-after", b"1")
            return 503, (
                f"the server is at its limit of {self.site.max_connections} connections; "
                "retry later"
            )
        hosts = twisted_private.header_values(self, b"Host")
        if hosts is None:
            if self.clientproto == b"HTTP/1.1":
                return 400, "an HTTP/1.1 request needs a Host header"
        elif len(hosts) > 1 or b"," in hosts[0]:
            return 400, "a request has one Host header"
        path = self.path
        if path[:1] == b"/":
            return None  # origin-form, as nearly every request is
        if path == b"*":
            if self.method != b"OPTIONS":
                return 400, "the target * is for OPTIONS only"
            return 501, "OPTIONS is not implemented"
        scheme, separator, rest = path.partition(b"://")
        if separator and scheme.lower() in (b"http", b"https"):
            # absolute-form: a server must accept it (RFC 9112 3.2.2)
            self.path = b"/" + rest.partition(b"/")[2]
            return None
        return 400, "the request target must be a /path or an absolute http URI"

    def processingFailed(self, reason: Failure) -> None:
        # twisted.web's version answers HTML; dache's answers are JSON.
        _log.failure("unexpected error serving a request", reason)
        if self.startedWriting:
            self.channel.transport.abortConnection()
            return
        finish(self, error(self, 500, "internal error; see the server log"))

    def begin_stream(
        self, content_type: bytes = b"text/event-stream", buffer_bytes: int = 65536
    ) -> Stream:
        """
        Start a streaming answer (200 unless a status was set): the headers go
        now, then each stream.write() as a chunk, until stream.close(). The
        stream is exempt from IDLE_TIMEOUT, REQUEST_TIMEOUT and SEND_TIMEOUT;
        it is closed instead once more than `buffer_bytes` wait for a client
        that does not read (see dache.web.stream). A HEAD gets the headers only.
        """
        self.setHeader(b"content-type", content_type)
        self.setHeader(b"cache-control", b"no-store")
        stream = Stream(self, buffer_bytes)
        self.write(b"")  # the status line and headers, now
        if self.method == b"HEAD":
            stream.close()
        return stream

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
        max_connections: int | None = None,
        output_buffer_bytes: int = 65536,
        pipeline_buffer_bytes: int = 16384,
        send_timeout: float = 30.0,
        **kwargs: Any,
    ):
        # dache reads bodies as JSON, never as forms: don't let twisted.web
        # parse the Content-Type of every POST (email.headerregistry, ~60 us).
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(resource, timeout=timeout, **kwargs)
        self.request_timeout = request_timeout  # see dache.web.channel
        # Bounds per connection (dache.web.channel): unsent output, pipelined
        # requests read ahead, and how long a client may leave answers unread.
        self.output_buffer_bytes = output_buffer_bytes
        self.pipeline_buffer_bytes = pipeline_buffer_bytes
        self.send_timeout = send_timeout
        self.max_connections = max_connections  # None: no limit
        self.outbox = Outbox()  # answers sent at the end of a reactor turn (dache.web.channel)
        self.open_connections = 0
        self.max_body_bytes = max_body_bytes
        self.log_requests = access_log
        self.redact_keys = redact_keys
        self.metrics = metrics

    def over_connection_limit(self) -> bool:
        return self.max_connections is not None and self.open_connections >= self.max_connections

    # A watch stream or blocking read is bounded by WATCH_MAX (dache.web.watch), not
    # MAX_CONNECTIONS: its connection leaves this count while it watches, so watchers
    # never leave ordinary requests without a connection.
    def watch_began(self) -> None:
        self.open_connections -= 1

    def watch_ended(self) -> None:
        self.open_connections += 1  # an ordinary connection again, until it is lost

    def log(self, request: Request) -> None:
        # Called once per answered request: the one place metrics count requests.
        if self.metrics is not None:
            self.metrics.request_finished(
                request.method, request.path, request.code, perf_counter() - request.received_at
            )
        # Per-request logging costs about a third of throughput: off by default.
        if not self.log_requests:
            return
        # The path as routed, never the query string (it may carry a token).
        path = request.path
        if self.redact_keys and path.startswith(KEY_PREFIX):
            path = KEY_PREFIX + b"<redacted>"
        if b"?" in request.uri:
            path += b"?<redacted>"
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
