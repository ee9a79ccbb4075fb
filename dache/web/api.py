"""
The HTTP API: dache's routes, declared once in a Klein app (DacheAPI.app),
and request parsing and validation. dache.web.dispatch serves them.

A route is one declaration, here or in a module of its own listed in
ROUTE_MODULES:

    @DacheAPI.app.route("/things/<path:key>", methods=["GET", "HEAD"])
    def get_thing(api: DacheAPI, request: IRequest, key: str) -> bytes: ...

A route whose rule ends in `<path:key>` gets its key already parsed (percent-
decoded, UTF-8, within MAX_KEY_BYTES) from the raw request target, and is
dispatched without werkzeug's per-request matching. A handler returns:
bytes (the body; set status and headers on the request), a Change (committed;
204 with its ETag), a Deferred firing with bytes, or NOT_DONE_YET (it
finishes the request itself, e.g. a stream: request.begin_stream()). It
raises APIError for a refusal. Every route needs its entry in
dache/web/openapi.json (tests/test_openapi.py checks both ways).

The API knows the cache (for reads) and the committer (for writes); it knows
nothing of engines, SQL or files.
"""

from __future__ import annotations

import importlib
import json
import math
import re
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

from klein import Klein
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from dache.engines import ANY, Change, EngineUnavailable, PreconditionFailed
from dache.rendering import render_json
from dache.store.cache import Cache, revision_of
from dache.store.committer import Committer
from dache.store.eviction import OutOfMemory
from dache.web import twisted_private
from dache.web.answer import CONTENT_TYPE, ETAG, JSON, APIError, error
from dache.web.health import HealthMonitor
from dache.web.health import respond as health_response
from dache.web.json_text import BadJSON, NotAnObject, object_members
from dache.web.openapi import openapi_document

if TYPE_CHECKING:
    from dache.web.metrics import Metrics

KEY_PREFIX = b"/dache/"
WRITE_FIELDS = ("value", "expiry", "ttl")
_WRITE_FIELD_SET = frozenset(WRITE_FIELDS)
# Latest expiry accepted: the end of year 9999 UTC, which every engine can store.
MAX_EXPIRY = 253402300799.0
# Longest ttl accepted (about 6,300 years): the OpenAPI document's bound, enforced.
MAX_TTL = 200_000_000_000


def parse_key(encoded: bytes, max_key_bytes: int) -> str:
    """The key from its percent-encoded form in the raw request target."""
    raw = unquote_to_bytes(encoded)
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


# RFC 9110 8.8.3: entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE, in a comma list.
_ETAG = rb'\s*(W/)?"([\x21\x23-\x7e\x80-\xff]*)"\s*'
_ETAG_LIST = re.compile(rb"(?:%s)(?:,(?:%s))*" % (_ETAG, _ETAG))
_ETAG_ONE = re.compile(_ETAG)


def parse_etags(header: bytes | None, name: str) -> str | tuple[int, ...] | None:
    """An If-Match / If-None-Match value: None, ANY, or the revisions it lists."""
    if header is None:
        return None
    if header.strip() == b"*":
        return ANY
    if _ETAG_LIST.fullmatch(header) is None:
        raise APIError(400, f'{name} must be * or a list of ETags like "12"')
    revisions = []
    for match in _ETAG_ONE.finditer(header):
        if match.group(1):
            continue  # a weak tag never matches a strong comparison
        # A strong comparison is byte for byte: '"012"' is not our '"12"'.
        inner = match.group(2)
        revision = int(inner) if inner.isdigit() and len(inner) < 20 else -1
        revisions.append(revision if etag(revision) == b'"%b"' % inner else -1)
    return tuple(revisions)


def apply_preconditions(request: IRequest, change: Change) -> Change:
    if_match = twisted_private.header_values(request, b"If-Match")
    if_none_match = twisted_private.header_values(request, b"If-None-Match")
    if if_match is not None:  # the last one, as getHeader() answers
        change.if_match = parse_etags(if_match[-1], "If-Match")
    if if_none_match is not None:
        change.if_none_match = parse_etags(if_none_match[-1], "If-None-Match")
    return change


def _number(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise APIError(400, f'"{field}" must be a number')
    if not math.isfinite(value):
        raise APIError(400, f'"{field}" must be a finite number')
    return value


def body_text(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise APIError(400, "body is not valid UTF-8")


def body_members(body: bytes, shape: str) -> tuple[str, dict[str, tuple[Any, int, int]]]:
    """A body's text and its object's members (json_text.object_members); shape: for the error."""
    text = body_text(body)
    try:
        return text, object_members(text)
    except NotAnObject:
        raise APIError(400, f"body must be a JSON object like {shape}")
    except BadJSON as e:
        raise APIError(400, f"body is not valid JSON: {e}")


def parse_write(body: bytes, key: str, now: float) -> Change:
    """
    The change a POST/PUT body asks for: a set, or a delete if already
    expired. The value is kept as the JSON text the client sent (see
    dache.web.json_text).
    """
    text, members = body_members(body, '{"value": ...}')
    if not _WRITE_FIELD_SET.issuperset(members):
        unknown = [name for name in members if name not in WRITE_FIELDS]
        raise APIError(
            400,
            f"unknown field {json.dumps(unknown[0])}; accepted fields: " + ", ".join(WRITE_FIELDS),
        )
    if "value" not in members:
        raise APIError(400, 'body must have a "value" field')
    if "expiry" in members and "ttl" in members:
        raise APIError(400, 'give either "expiry" or "ttl", not both')
    value, start, end = members["value"]
    if len(text) == len(body):  # ASCII: character offsets are byte offsets
        value_json = body[start:end]
    else:
        value_json = text[start:end].encode("utf-8")
    if b"\\u" in value_json:
        try:  # a lone surrogate escape ("\ud800") is valid JSON but not Unicode
            render_json(value)
        except ValueError as e:
            raise APIError(400, f'"value" {e}')

    expiry = members["expiry"][0] if "expiry" in members else None
    if expiry is not None:
        expiry = _number("expiry", expiry)
        if expiry > MAX_EXPIRY:
            raise APIError(400, '"expiry" must be at or before 9999-12-31T23:59:59Z')
    ttl = members["ttl"][0] if "ttl" in members else None
    if ttl is not None:
        ttl = _number("ttl", ttl)
        if ttl <= 0:
            raise APIError(400, '"ttl" must be a positive number of seconds')
        if ttl > MAX_TTL:
            raise APIError(400, f'"ttl" must be at most {MAX_TTL} seconds')
        expiry = now + ttl
        if expiry > MAX_EXPIRY:
            raise APIError(400, '"ttl" reaches past 9999-12-31T23:59:59Z')
    if expiry is not None and expiry <= now:
        # An expiry in the past is a durable delete: it is never served.
        return Change.delete(key)
    return Change.set(key, value_json, expiry)


class DacheAPI:
    """The routes. `DacheAPI(...).resource()` is the root resource that serves them."""

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
        self.ui_enabled = True  # the web console at /ui (dache.web.ui); UI=false: 404

    def resource(self) -> Resource:
        from dache.web.dispatch import DacheResource

        declare_all_routes()  # the other modules' routes join the table before it is read
        return DacheResource(self)

    # -- routes

    @app.route("/dache", methods=["PUT"])  # GET (list, watch), DELETE, POST: dache.web.keyspace
    def empty_key(self, request: IRequest) -> bytes:
        raise APIError(400, "key must not be empty: use /dache/<key>")

    @app.route("/dache/<path:key>", methods=["GET", "HEAD"])
    def get(self, request: IRequest, key: str) -> bytes | int:
        if request.args and self.watch is not None and b"wait" in request.args:
            return self.watch.long_poll(request, key)  # a blocking read
        entry = self.cache.get(key, self.clock.seconds())
        if entry is None:
            raise APIError(404, "key not found")
        if twisted_private.header_values(request, b"If-None-Match") is not None:
            from dache.web.keyspace import not_modified  # (it builds on this module)

            if not_modified(request, revision_of(entry)):
                return b""
        twisted_private.set_header(request, CONTENT_TYPE, JSON)
        # etag_of and body_of, inlined
        twisted_private.set_header(request, ETAG, entry[entry[2] : entry[0]])
        return entry[entry[0] :]

    def request_body(self, request: IRequest) -> bytes:
        """The request's body; 413 past MAX_VALUE_BYTES."""
        body = request.content.read() if request.content is not None else b""
        if len(body) > self.max_value_bytes:
            raise APIError(413, f"body is over the {self.max_value_bytes}-byte limit")
        return body

    @app.route("/dache/<path:key>", methods=["POST", "PUT"])
    def set(self, request: IRequest, key: str) -> Change:
        change = parse_write(self.request_body(request), key, self.clock.seconds())
        return apply_preconditions(request, change)

    @app.route("/dache/<path:key>", methods=["DELETE"])
    def delete(self, request: IRequest, key: str) -> Change:
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

    @app.route("/openapi.json", methods=["GET", "HEAD"])
    def openapi(self, request: IRequest) -> bytes:
        request.setHeader(b"content-type", JSON)
        return openapi_document()

    # -- the answers to a write (dache.web.dispatch calls them)

    @staticmethod
    def acknowledged(revision: int, request: IRequest) -> bytes:
        request.setResponseCode(204)
        if revision:
            twisted_private.set_header(request, ETAG, etag(revision))
        return b""

    def write_failed(self, failure: Failure, request: IRequest) -> bytes | None:
        if failure.check(CancelledError):
            return None  # the client went away; the write itself carries on
        if failure.check(PreconditionFailed):
            current = failure.value.current_revision
            if current is None:
                return error(request, 412, "precondition failed: the key is absent")
            request.setHeader(b"etag", etag(current))
            return error(
                request, 412, f'precondition failed: the key\'s current ETag is "{current}"'
            )
        if failure.check(OutOfMemory):  # MAX_MEMORY (dache.store.eviction)
            return error(request, 507, str(failure.value))
        if failure.check(EngineUnavailable):
            request.setHeader(b"retry-after", b"1")
            return error(request, 503, str(failure.value))
        return self.unexpected(request, failure)

    def unexpected(self, request: IRequest, failure: Failure) -> bytes:
        """A bug: logged here, a bare 500 for the client."""
        self.log.failure(
            "unexpected error answering {method} request",
            failure,
            method=request.method.decode("ascii", "replace"),
        )
        return error(request, 500, "internal error; see the server log")


# Keys may hold "//" and end in "/": never let werkzeug merge or redirect them.
DacheAPI.app.url_map.merge_slashes = False
DacheAPI.app.url_map.strict_slashes = False

# Modules declaring more routes on DacheAPI.app (see the top of this module).
ROUTE_MODULES: tuple[str, ...] = ("dache.web.keyspace", "dache.web.ui")


def declare_all_routes() -> None:
    """Import ROUTE_MODULES, so DacheAPI.app holds every route."""
    for module in ROUTE_MODULES:
        importlib.import_module(module)
