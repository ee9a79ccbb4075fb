"""
The HTTP API: a Klein app with dache's routes, request parsing and validation,
and the mapping of errors to statuses. Every error body is JSON
{"error": "<what went wrong, for a person>"}; no traceback reaches a client.

The API knows the cache (for reads) and the committer (for writes); it knows
nothing of engines, SQL or files.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

from klein import Klein
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from werkzeug.exceptions import MethodNotAllowed, NotFound

from dache.engines import ANY, Change, EngineUnavailable, PreconditionFailed
from dache.rendering import render_json
from dache.store.cache import Cache
from dache.store.committer import Committer
from dache.web.health import HealthMonitor
from dache.web.health import respond as health_response

if TYPE_CHECKING:
    from dache.web.metrics import Metrics

KEY_PREFIX = b"/dache/"
WRITE_FIELDS = ("value", "expiry", "ttl")
_WRITE_FIELD_SET = frozenset(WRITE_FIELDS)
# Latest expiry accepted: the end of year 9999 UTC, which every engine can store.
MAX_EXPIRY = 253402300799.0
JSON = b"application/json"


class APIError(Exception):
    """A request dache refuses; becomes `status {"error": message}`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@lru_cache(maxsize=256)  # most messages repeat ("key not found"): render each once
def error_body(message: str) -> bytes:
    return render_json({"error": message})


def _reject_constant(name: str) -> None:
    raise APIError(400, f"body is not valid JSON: {name} is not a JSON number")


# One decoder for every body (json.loads with an argument builds a new one per call).
_decode_json = json.JSONDecoder(parse_constant=_reject_constant).decode


def parse_key(path: bytes, max_key_bytes: int) -> str:
    """The key from a raw request path /dache/<percent-encoded key>."""
    raw = unquote_to_bytes(path[len(KEY_PREFIX) :])
    if not raw:
        raise APIError(400, "key must not be empty")
    if len(raw) > max_key_bytes:
        raise APIError(400, f"key is {len(raw)} bytes; the limit is {max_key_bytes}")
    try:
        key = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise APIError(400, "key is not valid UTF-8")
    if "\x00" in key:
        raise APIError(400, "key must not contain a NUL character")
    return key


def etag(revision: int) -> bytes:
    return b'"%d"' % revision


def parse_etags(header: bytes | None, name: str) -> str | tuple[int, ...] | None:
    """An If-Match / If-None-Match value: None, ANY, or the revisions it lists."""
    if header is None:
        return None
    header = header.strip()
    if header == b"*":
        return ANY
    revisions = []
    for tag in header.split(b","):
        tag = tag.strip()
        if tag.startswith(b"W/"):
            continue  # a weak tag never matches a strong comparison
        if len(tag) < 3 or not (tag.startswith(b'"') and tag.endswith(b'"')):
            raise APIError(400, f'{name} must be * or a list of ETags like "12"')
        try:
            revisions.append(int(tag[1:-1]))
        except ValueError:
            revisions.append(-1)  # not one of ours: can never match
    return tuple(revisions)


def apply_preconditions(request: IRequest, change: Change) -> Change:
    change.if_match = parse_etags(request.getHeader(b"if-match"), "If-Match")
    change.if_none_match = parse_etags(request.getHeader(b"if-none-match"), "If-None-Match")
    return change


def _number(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise APIError(400, f'"{field}" must be a number')
    if not math.isfinite(value):
        raise APIError(400, f'"{field}" must be a finite number')
    return value


def parse_write(body: bytes, key: str, now: float) -> Change:
    """The change a POST/PUT body asks for: a set, or a delete if already expired."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise APIError(400, "body is not valid UTF-8")
    try:
        document = _decode_json(text)
    except json.JSONDecodeError as e:
        raise APIError(400, f"body is not valid JSON: {e}")
    except RecursionError:
        raise APIError(400, "body is not valid JSON: nested too deeply")
    if not isinstance(document, dict):
        raise APIError(400, 'body must be a JSON object like {"value": ...}')
    if not _WRITE_FIELD_SET.issuperset(document):
        unknown = [name for name in document if name not in WRITE_FIELDS]
        raise APIError(
            400, f'unknown field "{unknown[0]}"; accepted fields: ' + ", ".join(WRITE_FIELDS)
        )
    if "value" not in document:
        raise APIError(400, 'body must have a "value" field')
    if "expiry" in document and "ttl" in document:
        raise APIError(400, 'give either "expiry" or "ttl", not both')
    value = document["value"]
    if type(value) is str and b"\\" not in body:
        # No escape anywhere in the body, so the string holds no '"', no '\\' and
        # no control character (the decoder refuses raw ones): its JSON is itself
        # in quotes, exactly what the encoder writes after walking it character
        # by character (20 us for 10 KiB).
        value_json = b'"%b"' % value.encode("utf-8")
    else:
        try:
            value_json = render_json(value)
        except (ValueError, RecursionError) as e:
            raise APIError(400, f'"value" {e}')

    expiry = document.get("expiry")
    if expiry is not None:
        expiry = _number("expiry", expiry)
        if expiry > MAX_EXPIRY:
            raise APIError(400, '"expiry" must be at or before 9999-12-31T23:59:59Z')
    ttl = document.get("ttl")
    if ttl is not None:
        ttl = _number("ttl", ttl)
        if ttl <= 0:
            raise APIError(400, '"ttl" must be a positive number of seconds')
        expiry = now + ttl
        if expiry > MAX_EXPIRY:
            raise APIError(400, '"ttl" reaches past 9999-12-31T23:59:59Z')
    if expiry is not None and expiry <= now:
        # An expiry in the past is a durable delete: it is never served.
        return Change.delete(key)
    return Change.set(key, value_json, expiry)


class DacheAPI:
    """The routes. `DacheAPI(...).app.resource()` is the root resource."""

    app = Klein()
    log = Logger()

    def __init__(
        self,
        cache: Cache,
        committer: Committer,
        clock: Any,
        max_key_bytes: int = 1024,
        max_value_bytes: int = 1024 * 1024,
        health: HealthMonitor | None = None,
        metrics: Metrics | None = None,
        access: Any = None,
    ):
        self.access = access  # a dache.web.auth.Access, or None: no access control
        self.cache = cache
        self.committer = committer
        self.clock = clock
        self.max_key_bytes = max_key_bytes
        self.max_value_bytes = max_value_bytes
        if health is None:
            health = HealthMonitor(committer.engine, committer, cache, clock)
        self.monitor = health
        self.metrics = metrics  # None: METRICS=false
        self.watch: Any = None  # a dache.web.watch.Watchers, once attached

    def resource(self) -> Resource:
        return DacheResource(self)

    # -- routes

    @app.route("/dache", methods=["GET", "HEAD", "POST", "PUT", "DELETE"])
    @app.route("/dache/", methods=["GET", "HEAD", "POST", "PUT", "DELETE"])
    def empty_key(self, request: IRequest) -> Any:
        if self.watch is not None and request.method == b"GET" and self.watch.wants(request):
            return self.watch.stream(request)  # see dache.web.watch
        raise APIError(400, "key must not be empty: use /dache/<key>")

    @app.route("/dache/<path:_key>", methods=["GET", "HEAD"])
    def get(self, request: IRequest, _key: str) -> bytes | int:
        key = parse_key(request.path, self.max_key_bytes)
        if request.args and self.watch is not None and b"wait" in request.args:
            return self.watch.long_poll(request, key)  # a blocking read
        entry = self.cache.get(key, self.clock.seconds())
        if entry is None:
            raise APIError(404, "key not found")
        request.setHeader(b"content-type", JSON)
        request.setHeader(b"etag", etag(entry.revision))
        return entry.body

    @app.route("/dache/<path:_key>", methods=["POST", "PUT"])
    def set(self, request: IRequest, _key: str) -> Deferred[bytes]:
        return self._commit(request, self.set_change(request))

    @app.route("/dache/<path:_key>", methods=["DELETE"])
    def delete(self, request: IRequest, _key: str) -> Deferred[bytes]:
        return self._commit(request, self.delete_change(request))

    # The changes a write asks for; DacheResource commits them itself.

    def set_change(self, request: IRequest, _key: object = None) -> Change:
        key = parse_key(request.path, self.max_key_bytes)
        body = request.content.read() if request.content is not None else b""
        if len(body) > self.max_value_bytes:
            raise APIError(413, f"body is over the {self.max_value_bytes}-byte limit")
        change = parse_write(body, key, self.clock.seconds())
        return apply_preconditions(request, change)

    def delete_change(self, request: IRequest, _key: object = None) -> Change:
        key = parse_key(request.path, self.max_key_bytes)
        return apply_preconditions(request, Change.delete(key))

    # -- health and metrics (see dache.web.health, dache.web.metrics)

    @app.route("/health", methods=["GET", "HEAD"])
    def health(self, request: IRequest) -> Deferred[bytes]:
        return self.monitor.health().addCallback(health_response, request)

    @app.route("/health/live", methods=["GET", "HEAD"])
    def health_live(self, request: IRequest) -> Deferred[bytes]:
        return self.monitor.live().addCallback(health_response, request)

    @app.route("/health/ready", methods=["GET", "HEAD"])
    def health_ready(self, request: IRequest) -> Deferred[bytes]:
        return self.monitor.ready().addCallback(health_response, request)

    @app.route("/metrics", methods=["GET", "HEAD"])
    def scrape(self, request: IRequest) -> Deferred[bytes]:
        if self.metrics is None:
            raise APIError(404, "metrics are turned off (METRICS=false)")
        return self.metrics.render(request)

    # -- writes

    def _commit(self, request: IRequest, change: Change) -> Deferred[bytes]:
        d = self.committer.submit(change)
        d.addCallbacks(self._acknowledged, self._write_failed, (request,), None, (request,))
        return d

    @staticmethod
    def _acknowledged(revision: int, request: IRequest) -> bytes:
        request.setResponseCode(204)
        if revision:
            request.setHeader(b"etag", etag(revision))
        return b""

    def _write_failed(self, failure: Failure, request: IRequest) -> bytes | None:
        if failure.check(CancelledError):
            return None  # the client went away; the write itself carries on
        if failure.check(PreconditionFailed):
            current = failure.value.current_revision
            if current is None:
                return self._error(request, 412, "precondition failed: the key is absent")
            request.setHeader(b"etag", etag(current))
            return self._error(
                request, 412, f'precondition failed: the key\'s current ETag is "{current}"'
            )
        if failure.check(EngineUnavailable):
            request.setHeader(b"retry-after", b"1")
            return self._error(request, 503, str(failure.value))
        self.log.failure("unexpected error answering a write", failure)
        return self._error(request, 500, "internal error; see the server log")

    # -- errors

    @staticmethod
    def _error(request: IRequest, status: int, message: str) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", JSON)
        return error_body(message)

    @app.handle_errors(APIError)
    def api_error(self, request: IRequest, failure: Failure) -> bytes:
        return self._error(request, failure.value.status, failure.value.message)

    @app.handle_errors(NotFound)
    def not_found(self, request: IRequest, failure: Failure) -> bytes:
        return self._error(request, 404, "no such route; keys live under /dache/<key>")

    @app.handle_errors(MethodNotAllowed)
    def method_not_allowed(self, request: IRequest, failure: Failure) -> bytes:
        allowed = failure.value.valid_methods or []
        request.setHeader(b"allow", ", ".join(sorted(allowed)).encode("ascii"))
        method = request.method.decode("ascii", "replace")
        return self._error(request, 405, f"method {method} is not allowed here")

    @app.handle_errors(Exception)
    def unexpected(self, request: IRequest, failure: Failure) -> bytes:
        self.log.failure(
            "unexpected error answering {method} request",
            failure,
            method=request.method.decode("ascii", "replace"),
        )
        return self._error(request, 500, "internal error; see the server log")


# Keys may hold "//" and end in "/": never let werkzeug merge or redirect them.
DacheAPI.app.url_map.merge_slashes = False
DacheAPI.app.url_map.strict_slashes = False


class DacheResource(Resource):
    """
    The root resource. Requests for /dache/<key> with a method in key_methods
    go straight to the API's handlers; everything else goes through the Klein
    app.

    Why: Klein binds a werkzeug URL map and matches rules on every request,
    which costs more than the whole GET of an entry. The key routes are still
    declared in the Klein app, with the same handlers, so there is one route
    table; this only skips the matching for the hot ones. Writes take the
    change from the same handlers and hand it to the committer with their
    answer (Committer.submit_to), not through a Deferred: a Deferred's
    creation, firing and callback loop cost more than the memory engine's
    whole write.
    """

    isLeaf = True

    def __init__(self, api: DacheAPI):
        super().__init__()
        self.api = api
        self.klein = api.app.resource()
        self.access = api.access
        self.key_methods = {
            b"GET": api.get,
            b"HEAD": api.get,
            b"POST": api.set_change,
            b"PUT": api.set_change,
            b"DELETE": api.delete_change,
        }

    def render(self, request: IRequest) -> bytes | int:
        if self.access is not None:  # the one access check, for every route
            refusal = self.access.refuse(request)
            if refusal is not None:
                return refusal
        handler = self.key_methods.get(request.method)
        if handler is None or not request.path.startswith(KEY_PREFIX):
            return self.klein.render(request)
        try:
            result = handler(request, None)
        except APIError as e:
            return self.api._error(request, e.status, e.message)
        except Exception:
            return self.api.unexpected(request, Failure())
        if isinstance(result, Change):
            self.api.committer.submit_to(result, _WriteAnswer(self.api, request))
            return NOT_DONE_YET
        return result


class _WriteAnswer:
    """
    A write's HTTP answer, as the committer's submit_to() calls it: directly,
    so it must never raise into the committer.
    """

    __slots__ = ("api", "request")

    def __init__(self, api: DacheAPI, request: IRequest):
        self.api = api
        self.request = request

    def callback(self, revision: int) -> None:
        try:
            _finish(self.api._acknowledged(revision, self.request), self.request)
        except Exception:
            _failed_to_answer(self.api, self.request)

    def errback(self, failure: Failure) -> None:
        try:
            _finish(self.api._write_failed(failure, self.request), self.request)
        except Exception:
            _failed_to_answer(self.api, self.request)


def _failed_to_answer(api: DacheAPI, request: IRequest) -> None:
    try:
        _finish(api.unexpected(request, Failure()), request)
    except Exception:
        api.log.failure("could not answer a write")


def _finish(body: bytes | None, request: IRequest) -> None:
    if body is None or request._disconnected:
        return  # the client went away; the write itself carried on
    if body:
        request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body)
    request.finish()
