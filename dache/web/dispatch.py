"""
DacheResource: the root resource. It serves every route of the Klein app's
table (dache.web.api) and turns whatever a handler returns or raises into
the answer, through one path (dache.web.answer).

Why not Klein's own resource: Klein binds a werkzeug URL map and matches
rules on every request, which costs more than the whole GET of an entry, and
answers writes through Deferreds, which cost more than the memory engine's
whole write. So:

- the table is read from the Klein app's url_map once, at start-up; a rule
  ending in `<path:key>` becomes a prefix -> {method: handler} entry, and a
  request whose raw target starts with that prefix is served without
  werkzeug. The key is cut from that same raw target (one parse), so a
  request can never route to one key and write another;
- every other request is matched by werkzeug against the same url_map, on
  the raw (not percent-decoded) path: `/dache%2Fk` is not `/dache/k`;
- a write's Change goes to the committer with its answer (submit_to), not
  through a Deferred.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from werkzeug.exceptions import MethodNotAllowed, NotFound

from dache.engines import Change
from dache.web import twisted_private
from dache.web.answer import CONTENT_LENGTH, APIError, error, finish
from dache.web.api import DacheAPI, parse_key

KEY_VARIABLE = "<path:key>"
# Content codings dache understands in a request body: none.
IDENTITY = (None, [b"identity"])


def _handler(app: Any, endpoint: str) -> Callable[..., Any]:
    """The function declared for `endpoint`, unwrapped from Klein's executor."""
    return inspect.unwrap(app.endpoints[endpoint])


def key_routes(app: Any) -> list[tuple[bytes, dict[bytes, Callable[..., Any]]]]:
    """(prefix, {method: handler}) for every rule ending in <path:key>, longest first."""
    table: dict[bytes, dict[bytes, Callable[..., Any]]] = {}
    for rule in app.url_map.iter_rules():
        if rule.rule.endswith(KEY_VARIABLE):
            prefix = rule.rule[: -len(KEY_VARIABLE)]
            if "<" in prefix:
                raise ValueError(f"a key route has one variable, <path:key>: {rule.rule}")
            methods = table.setdefault(prefix.encode("ascii"), {})
            for method in rule.methods:
                methods[method.encode("ascii")] = _handler(app, rule.endpoint)
    return sorted(table.items(), key=lambda item: -len(item[0]))


class DacheResource(Resource):
    isLeaf = True

    def __init__(self, api: DacheAPI):
        super().__init__()
        self.api = api
        self.access = api.access
        app = api.app
        self.app = app
        self.key_routes = key_routes(app)
        self.adapter = app.url_map.bind("dache", "/")

    def render(self, request: IRequest) -> bytes | int:
        try:
            result = self._route(request)
        except APIError as e:
            for name, value in e.headers.items():
                request.setHeader(name, value)
            result = error(request, e.status, e.message)
        except Exception:
            result = self.api.unexpected(request, Failure())
        if type(result) is bytes:
            # The answer now; Request.render (or DacheRequest) sends it.
            if request.method == b"HEAD":
                twisted_private.set_header(request, CONTENT_LENGTH, b"%d" % len(result))
                return b""
            return result
        if isinstance(result, Change):
            self.api.committer.submit_to(result, _WriteAnswer(self.api, request))
        elif isinstance(result, Deferred):
            # As Klein does: a client that goes away cancels what its answer waits on
            # (a watch stream, a blocking read), so nothing is left holding it.
            request.notifyFinish().addErrback(_cancel_on_disconnect, result)
            result.addCallbacks(_answer_later, self._failed_later, (request,), None, (request,))
        elif result is not NOT_DONE_YET:
            raise TypeError(f"a route returned {type(result).__name__}")
        return NOT_DONE_YET

    def _route(self, request: IRequest) -> Any:
        method = request.method  # case-sensitive (RFC 9110 9.1): "get" is not GET: 405
        if self.access is not None:  # the one access check, for every route
            refusal = self.access.refuse(request)
            if refusal is not None:
                return refusal
        encodings = twisted_private.header_values(request, b"Content-Encoding")
        if encodings not in IDENTITY:
            raise APIError(415, "Content-Encoding is not supported; send the body as is")
        path = request.path
        for prefix, methods in self.key_routes:
            if path.startswith(prefix):
                handler = methods.get(method)
                if handler is None:
                    raise _not_allowed(method, methods)
                key = parse_key(path[len(prefix) :], self.api.max_key_bytes)
                return handler(self.api, request, key)
        name = method.decode("latin-1")
        if name != name.upper():
            name = "-"  # werkzeug upper-cases methods; dache does not: never a route's
        try:
            endpoint, arguments = self.adapter.match(path.decode("latin-1"), name)
        except NotFound:
            raise APIError(404, "no such route; keys live under /dache/<key>")
        except MethodNotAllowed as e:
            raise _not_allowed(method, [m.encode("ascii") for m in e.valid_methods or ()])
        return _handler(self.app, endpoint)(self.api, request, **arguments)

    def _failed_later(self, failure: Failure, request: IRequest) -> None:
        if failure.check(CancelledError):
            return  # the client went away (see _cancel_on_disconnect)
        if failure.check(APIError):
            finish(request, error(request, failure.value.status, failure.value.message))
        else:
            finish(request, self.api.unexpected(request, failure))


def _cancel_on_disconnect(reason: Failure, answer: Deferred) -> None:
    answer.cancel()


def _answer_later(body: bytes | None, request: IRequest) -> None:
    finish(request, body)


def _not_allowed(method: bytes, allowed: Any) -> APIError:
    return APIError(
        405,
        f"method {method.decode('latin-1')} is not allowed here",
        {b"allow": b", ".join(sorted(allowed))},
    )


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
            finish(self.request, self.api.acknowledged(revision, self.request))
        except Exception:
            _failed_to_answer(self.api, self.request)

    def errback(self, failure: Failure) -> None:
        try:
            finish(self.request, self.api.write_failed(failure, self.request))
        except Exception:
            _failed_to_answer(self.api, self.request)


def _failed_to_answer(api: DacheAPI, request: IRequest) -> None:
    try:
        finish(request, api.unexpected(request, Failure()))
    except Exception:
        api.log.failure("could not answer a write")
