"""
dache.client: a Python client for dache's public HTTP API, on httpx.

    from dache.client import Client
    with Client("http://127.0.0.1:8080", token="...") as dache:
        dache.set("user/42", {"name": "Ada"}, ttl=3600)
        entry = dache.get("user/42")          # Entry(key, value, expiry, revision)

`url` may also be `unix:/run/dache.sock` (a Unix socket). Every error answer
becomes one exception class per kind (NotFound, PreconditionFailed, ...), all
DacheError; network failures are Unavailable. dachectl (dache.ctl) is written
on this module only.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

DEFAULT_URL = "http://127.0.0.1:8080"
_MISSING: Any = object()


# -- errors: one class per kind of answer


class DacheError(Exception):
    """An error answer (its status and the server's message) or a failed request."""

    status: int | None = None

    def __init__(self, message: str, status: int | None = None, body: Any = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        self.body = body


class BadRequest(DacheError):
    status = 400


class Unauthorized(DacheError):
    status = 401


class Forbidden(DacheError):
    status = 403


class NotFound(DacheError):
    status = 404


class Conflict(DacheError):
    """409: e.g. an increment of a value that is not a number."""

    status = 409


class PreconditionFailed(DacheError):
    """412: If-Match / If-None-Match (or a batch op's precondition) did not hold."""

    status = 412

    @property
    def failed(self) -> list[int]:
        """For a batch: the indexes of the ops whose precondition failed."""
        return list(self.body.get("failed", [])) if isinstance(self.body, dict) else []


class TooLarge(DacheError):
    status = 413


class ServerError(DacheError):
    """5xx: the engine is down, a timeout, shutting down (503), or a bug (500)."""


class OutOfMemory(ServerError):
    """507: the node is at MAX_MEMORY with EVICTION_POLICY=noeviction (or nothing to evict)."""

    status = 507


class Unavailable(DacheError):
    """No answer at all: connection refused or cut, a timeout, a TLS failure."""


_BY_STATUS: dict[int, type[DacheError]] = {
    cls.status: cls  # type: ignore[misc]
    for cls in (
        BadRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        Conflict,
        PreconditionFailed,
        TooLarge,
        OutOfMemory,
    )
}


# -- results


@dataclass(frozen=True)
class Entry:
    key: str
    value: Any
    expiry: float | None = None  # unix seconds, UTC; None: never expires
    revision: int | None = None  # the entry's ETag as a number

    @classmethod
    def from_json(cls, doc: dict[str, Any], revision: int | None = None) -> Entry:
        return cls(doc["key"], doc.get("value"), doc.get("expiry"), doc.get("revision", revision))


@dataclass(frozen=True)
class Page:
    entries: list[Entry]  # values are None when listed with values=False
    next: str | None  # pass as `after` for the next page; None: this was the last
    revision: int  # the node's revision when read: where a watch resumes


@dataclass(frozen=True)
class Event:
    kind: str  # "set", "delete", "expire", "reset", "error"
    revision: int | None
    key: str | None
    value: Any = None
    expiry: float | None = None
    data: Any = None  # the whole decoded data line


def _etag_revision(headers: httpx.Headers) -> int | None:
    tag = headers.get("etag")
    if tag is None:
        return None
    try:
        return int(tag.strip('"'))
    except ValueError:
        return None


def key_path(key: str) -> str:
    return "/dache/" + quote(key, safe="")


def _error(response: httpx.Response) -> DacheError:
    try:
        body = response.json()
        message = body.get("error") if isinstance(body, dict) else None
    except ValueError:
        body, message = None, None
    message = message or response.reason_phrase or "error"
    cls = _BY_STATUS.get(response.status_code)
    if cls is None:
        cls = ServerError if response.status_code >= 500 else DacheError
    return cls(f"{response.status_code}: {message}", response.status_code, body)


def _transport_for(url: str, verify: Any) -> tuple[str, httpx.HTTPTransport | None]:
    """unix:/path -> (a base URL, a transport on that socket)."""
    if url.startswith("unix:"):
        path = url[len("unix:") :]
        return "http://dache", httpx.HTTPTransport(uds=path, verify=verify)
    return url.rstrip("/"), None


class Client:
    """A synchronous client. `ca` is a CA bundle file for https (TLS) URLs."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        token: str | None = None,
        ca: str | None = None,
        timeout: float = 10.0,
    ):
        verify: Any = False  # plain http and unix: no certificates to load (it costs ~0.3 s)
        if url.startswith("https:"):
            verify = ssl.create_default_context(cafile=ca) if ca else True
        base, transport = _transport_for(url, verify)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url
        self._http = httpx.Client(
            base_url=base, headers=headers, timeout=timeout, verify=verify, transport=transport
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise Unavailable(f"{type(e).__name__}: {e or 'no answer'} ({self.url})") from None
        if response.status_code >= 400:
            raise _error(response)
        return response

    # -- single keys

    def get(self, key: str) -> Entry:
        """The entry, or NotFound."""
        response = self._request("GET", key_path(key))
        return Entry.from_json(response.json(), _etag_revision(response.headers))

    def set(
        self,
        key: str,
        value: Any,
        ttl: float | None = None,
        expiry: float | None = _MISSING,
        if_match: int | str | None = None,
        if_absent: bool = False,
    ) -> int | None:
        """Store `value` (any JSON value); returns the new revision."""
        body: dict[str, Any] = {"value": value}
        if ttl is not None:
            body["ttl"] = ttl
        if expiry is not _MISSING:
            body["expiry"] = expiry
        response = self._request(
            "PUT", key_path(key), json=body, headers=_preconditions(if_match, if_absent)
        )
        return _etag_revision(response.headers)

    def delete(self, key: str, if_match: int | str | None = None) -> None:
        """Delete the key (no error when it is absent, unless `if_match` is given)."""
        self._request("DELETE", key_path(key), headers=_preconditions(if_match, False))

    def patch(
        self,
        key: str,
        ttl: float | None = None,
        expiry: float | None = _MISSING,
        increment: int | float | None = None,
        if_match: int | str | None = None,
    ) -> Entry | None:
        """Touch (ttl/expiry) and/or increment; the new entry (None if an expiry deleted it)."""
        body: dict[str, Any] = {}
        if ttl is not None:
            body["ttl"] = ttl
        if expiry is not _MISSING:
            body["expiry"] = expiry
        if increment is not None:
            body["increment"] = increment
        response = self._request(
            "PATCH", key_path(key), json=body, headers=_preconditions(if_match, False)
        )
        if response.status_code == 204:
            return None
        return Entry.from_json(response.json(), _etag_revision(response.headers))

    def health(self) -> dict[str, Any]:
        """/health's document, also when it answers 503 (status "fail")."""
        try:
            response = self._http.get("/health")
        except httpx.HTTPError as e:
            raise Unavailable(f"{type(e).__name__}: {e or 'no answer'} ({self.url})") from None
        if response.status_code in (200, 503):
            try:
                doc = response.json()
            except ValueError:
                doc = None
            if isinstance(doc, dict):
                return doc
        raise _error(response)

    # -- the key space

    def list(
        self, prefix: str = "", limit: int = 100, after: str | None = None, values: bool = True
    ) -> Page:
        """One page of keys under `prefix`, in code-point order."""
        params: dict[str, Any] = {"prefix": prefix, "limit": limit}
        if after is not None:
            params["after"] = after
        if not values:
            params["values"] = "false"
        doc = self._request("GET", "/dache", params=params).json()
        entries = [Entry.from_json(e) for e in doc["entries"]]
        return Page(entries, doc.get("next"), doc.get("revision", 0))

    def scan(self, prefix: str = "", page: int = 1000, values: bool = True) -> Iterator[Entry]:
        """Every entry under `prefix`, page by page."""
        after = None
        while True:
            result = self.list(prefix, limit=page, after=after, values=values)
            yield from result.entries
            if result.next is None:
                return
            after = result.next

    def count(self, prefix: str = "") -> int:
        return int(
            self._request("GET", "/dache", params={"prefix": prefix, "count": "true"}).json()[
                "count"
            ]
        )

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under a non-empty prefix, in one engine batch; how many."""
        if not prefix:
            raise BadRequest("prefix must not be empty", 400)
        return int(self._request("DELETE", "/dache", params={"prefix": prefix}).json()["deleted"])

    def batch(self, ops: Iterable[dict[str, Any]]) -> list[Any]:
        """An atomic batch: every op applies, or (PreconditionFailed, .failed) none does."""
        response = self._request("POST", "/dache", json={"ops": list(ops)})
        return [
            Entry.from_json(r) if isinstance(r, dict) else r for r in response.json()["results"]
        ]

    # -- watch

    def watch(
        self,
        prefix: str = "",
        since: int | None = None,
        retry: float = 0.5,
        give_up_after: float | None = 60.0,
    ) -> Iterator[Event]:
        """
        Every change under `prefix`, in revision order, as it happens. A dropped
        connection is resumed after the last event seen (Last-Event-ID), so no
        change is missed or repeated; after `give_up_after` seconds without a
        connection, Unavailable is raised (None: retry forever).
        """
        last = since
        down_since: float | None = None
        while True:
            params: dict[str, Any] = {"watch": "true", "prefix": prefix}
            headers = {"Accept": "text/event-stream"}
            if last is not None:
                params["since"] = last
                headers["Last-Event-ID"] = str(last)
            try:
                with self._http.stream(
                    "GET",
                    "/dache",
                    params=params,
                    headers=headers,
                    timeout=httpx.Timeout(10.0, read=None),
                ) as response:
                    if response.status_code >= 400:
                        response.read()
                        raise _error(response)
                    down_since = None
                    for event in _events(response.iter_lines()):
                        if event.revision is not None:
                            last = event.revision
                        yield event
            except (httpx.HTTPError, ServerError) as e:
                # No answer, a cut stream, or a node shutting down / starting (503): try again.
                now = time.monotonic()
                down_since = down_since or now
                if give_up_after is not None and now - down_since > give_up_after:
                    raise Unavailable(f"watch: {type(e).__name__}: {e} ({self.url})") from None
            time.sleep(retry)


def _events(lines: Iterable[str]) -> Iterator[Event]:
    """Server-Sent Events -> Event, per the WHATWG event-stream format."""
    kind, ident, data = "message", None, []
    for line in lines:
        if not line:
            if data:
                yield _event(kind, ident, "\n".join(data))
            kind, ident, data = "message", None, []
            continue
        if line.startswith(":"):
            continue  # a heartbeat comment
        field, _, text = line.partition(":")
        text = text[1:] if text.startswith(" ") else text
        if field == "event":
            kind = text
        elif field == "id":
            ident = text
        elif field == "data":
            data.append(text)


def _event(kind: str, ident: str | None, text: str) -> Event:
    try:
        data = json.loads(text)
    except ValueError:
        data = text
    doc = data if isinstance(data, dict) else {}
    revision = doc.get("revision")
    if revision is None and ident and ident.isdigit():
        revision = int(ident)
    return Event(kind, revision, doc.get("key"), doc.get("value"), doc.get("expiry"), data)


def _preconditions(if_match: int | str | None, if_absent: bool) -> dict[str, str]:
    headers = {}
    if if_match is not None:
        tag = str(if_match).strip('"')
        headers["If-Match"] = "*" if tag == "*" else f'"{tag}"'
    if if_absent:
        headers["If-None-Match"] = "*"
    return headers
