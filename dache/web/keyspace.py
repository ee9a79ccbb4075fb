"""
The key-space routes (a ROUTE_MODULES entry of dache.web.api):

    GET    /dache?prefix=&limit=&after=&values=&count=   list in key order
    DELETE /dache?prefix=<p>                            range delete, one batch
    POST   /dache {"ops": [...]}                        atomic batch / multi-get
    PATCH  /dache/<key> {"ttl"|"expiry"|"increment"}    touch and increment

Reads come from memory (dache.store.listing); every write goes through the
committer, decided in commit order (dache.engines.decide), so these have the
guarantees of single-key writes: durable before visible, one order, bad input
a 4xx JSON error that changes nothing.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from dache.engines import DELETE, GET, Change, PreconditionFailed
from dache.engines.decide import Group, KeyAbsent, NotANumber
from dache.rendering import render_json, render_key
from dache.store import listing
from dache.store.cache import Entry, body_of, render_entry, revision_of
from dache.web.answer import JSON, error
from dache.web.api import DacheAPI, apply_preconditions, etag, parse_etags
from dache.web.ops import (
    batch_changes,
    batch_ops,
    multi_get_keys,
    parse_list,
    parse_patch,
    parse_prefix_delete,
)

# Why a group member was rejected -> the answer's status.
_STATUS = {PreconditionFailed: 412, KeyAbsent: 404, NotANumber: 409}


def _json(request: IRequest, body: bytes, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", JSON)
    return body


def listed(entry: Entry) -> bytes:
    """An entry with its revision: its pre-rendered body with "revision" in front."""
    return b'{"revision":%d,%b' % (revision_of(entry), entry[entry[0] + 1 :])


def rendered(key: str, value_json: bytes, expiry: float | None, revision: int) -> bytes:
    return listed(render_entry(render_key(key), value_json, expiry, revision))


# -- GET /dache


@DacheAPI.app.route("/dache", methods=["GET", "HEAD"])
def list_keys(api: DacheAPI, request: IRequest) -> Any:
    if api.watch is not None and request.method == b"GET" and api.watch.wants(request):
        return api.watch.stream(request)  # GET /dache?watch=true: dache.web.watch
    query = parse_list(request)
    now = api.clock.seconds()
    if query.count:
        return _json(request, render_json({"count": listing.count(api.cache, query.prefix, now)}))
    found, after = listing.page(api.cache, query.prefix, query.after, query.limit, now)
    if query.values:
        entries = [listed(entry) for _, entry in found]
    else:
        entries = [b'{"key":%b,"revision":%d}' % (render_key(k), revision_of(e)) for k, e in found]
    return _json(
        request,
        b'{"entries":[%b],"next":%b,"revision":%d}'
        % (b",".join(entries), render_json(after), api.cache.revision),
    )


# -- DELETE /dache?prefix=


@DacheAPI.app.route("/dache", methods=["DELETE"])
def delete_prefix(api: DacheAPI, request: IRequest) -> bytes | Deferred[bytes]:
    prefix = parse_prefix_delete(request)
    keys = listing.keys_under(api.cache, prefix, api.clock.seconds())
    # An engine shared by several nodes decides the range in its transaction:
    # it also deletes the keys under the prefix this node has not followed yet.
    shared = getattr(api.committer.engine, "decides_preconditions", False)
    if not keys and not shared:
        return _json(request, b'{"deleted":0}')
    members = [Change.delete(key) for key in keys] or [Change(GET, prefix)]  # (a read: no change)
    group = Group(members, prefix=prefix)
    d = api.committer.submit_group(group)
    d.addCallback(lambda _: _json(request, b'{"deleted":%d}' % (len(keys) + group.extra)))
    return d.addErrback(api.write_failed, request)


# -- POST /dache


@DacheAPI.app.route("/dache", methods=["POST"])
def batch(api: DacheAPI, request: IRequest) -> bytes | Deferred[bytes]:
    text, ops, start = batch_ops(api.request_body(request))
    keys = multi_get_keys(ops, api.max_key_bytes)
    if keys is None:
        changes = batch_changes(text, ops, start, api.max_key_bytes, api.clock.seconds())
        if all(change.kind == GET for change in changes):
            keys = [change.key for change in changes]
    if keys is not None:
        return _json(request, _multi_get(api, keys))  # from memory: no engine
    group = Group(changes)
    d = api.committer.submit_group(group)
    d.addCallbacks(_batch_done, _batch_failed, (request,), None, (api, request, group))
    return d


def _multi_get(api: DacheAPI, keys: list[str]) -> bytes:
    now, get = api.clock.seconds(), api.cache.get
    results = []
    for key in keys:
        entry = get(key, now)
        results.append(b"null" if entry is None else listed(entry))
    return b'{"results":[%b]}' % b",".join(results)


def _result(change: Change) -> bytes:
    if change.kind != GET:
        return b"%d" % change.revision
    if change.value_json is None:
        return b"null"
    return rendered(change.key, change.value_json, change.expiry, change.revision)


def _batch_done(group: Group, request: IRequest) -> bytes:
    results = b",".join(_result(change) for change in group.changes)
    return _json(request, b'{"results":[%b]}' % results)


def _batch_failed(failure: Failure, api: DacheAPI, request: IRequest, group: Group) -> Any:
    failed = group.failed
    if not failed:  # the engine, a timeout, shutting down: as a single write
        return api.write_failed(failure, request)
    first = group.changes[failed[0]]
    error = first.error
    status = 412 if error is None else _STATUS.get(type(error), 409)
    if error is None:
        what = "absent" if not first.revision else f"at revision {first.revision}"
        message = f"precondition failed for ops[{failed[0]}]: the key is {what}"
    else:
        message = f"ops[{failed[0]}]: {error}"
    body = render_json({"error": message, "failed": failed})
    return _json(request, body, status)


# -- PATCH /dache/<key>


@DacheAPI.app.route("/dache/<path:key>", methods=["PATCH"])
def patch(api: DacheAPI, request: IRequest, key: str) -> Deferred[bytes]:
    change = parse_patch(api.request_body(request), key, api.clock.seconds())
    apply_preconditions(request, change)
    d = api.committer.submit(change)
    d.addCallbacks(_patched, _patch_failed, (change, request), None, (api, request))
    return d


def _patched(revision: int, change: Change, request: IRequest) -> bytes:
    request.setHeader(b"etag", etag(revision))
    if change.kind == DELETE:  # an expiry in the past: the key is gone, as for POST
        request.setResponseCode(204)
        return b""
    assert change.value_json is not None
    body = body_of(render_entry(render_key(change.key), change.value_json, change.expiry, revision))
    return _json(request, body)


def _patch_failed(failure: Failure, api: DacheAPI, request: IRequest) -> Any:
    if failure.check(KeyAbsent):
        return error(request, 404, "key not found")
    if failure.check(NotANumber):
        return error(request, 409, str(failure.value))
    return api.write_failed(failure, request)


# -- conditional GET


def not_modified(request: IRequest, revision: int) -> bool:
    """
    GET with If-None-Match naming the entry's current ETag (or *): answer 304
    with the ETag and no body.
    """
    header = request.getHeader(b"if-none-match")
    if header is None:
        return False
    tags = parse_etags(header, "If-None-Match")
    if tags == "*" or (isinstance(tags, tuple) and revision in tags):
        request.setResponseCode(304)
        request.setHeader(b"etag", etag(revision))
        return True
    return False
