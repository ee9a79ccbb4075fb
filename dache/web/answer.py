"""
The one answer path: every answer dache sends -- a route's, an error, a
refusal of the protocol layer -- ends in finish() on its Request, so the
access log and dache_http_requests_total see every status. A body, where
there is one, is JSON; an error's is {"error": "<for a person>"}.
"""

from __future__ import annotations

from functools import lru_cache

from twisted.web.iweb import IRequest

from dache.rendering import render_json
from dache.web import twisted_private

JSON = b"application/json"
# Header names as twisted.web's Headers spells them (twisted_private.set_header).
CONTENT_TYPE = b"Content-Type"
CONTENT_LENGTH = b"Content-Length"
ETAG = b"ETag"


class APIError(Exception):
    """A request dache refuses; becomes `status {"error": message}`."""

    def __init__(self, status: int, message: str, headers: dict[bytes, bytes] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@lru_cache(maxsize=256)  # most messages repeat ("key not found"): render each once
def error_body(message: str) -> bytes:
    return render_json({"error": message})


def error(request: IRequest, status: int, message: str) -> bytes:
    """Set `status` and the JSON content type; return the error's body."""
    request.setResponseCode(status)
    twisted_private.set_header(request, CONTENT_TYPE, JSON)
    return error_body(message)


def finish(request: IRequest, body: bytes | None) -> None:
    """
    End `request` with `body` (status and headers already set). A HEAD gets
    the Content-Length of the body it is not sent. None: the client went away.
    """
    if body is None or twisted_private.client_gone(request):
        return  # the client went away; whatever it asked for carried on
    twisted_private.set_header(request, CONTENT_LENGTH, b"%d" % len(body))
    if body and request.method != b"HEAD":
        request.write(body)
    request.finish()
