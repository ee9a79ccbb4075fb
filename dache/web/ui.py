"""
The web console at /ui: static files shipped in the package (dache/web/console),
read once and served from memory. No build step, no CDN; the page talks to
dache's public HTTP API like any other client. UI=false turns it off (404).

The files are public (they hold no data), so /ui needs no token; the page asks
for one when the API answers 401 and keeps it in sessionStorage. A ROUTE_MODULES
entry of dache.web.api.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from twisted.web.iweb import IRequest

from dache.web.answer import APIError
from dache.web.api import DacheAPI

PATH = b"/ui"
FILES = {  # name under /ui/ -> (file in dache/web/console, content type)
    "": ("index.html", b"text/html; charset=utf-8"),
    "index.html": ("index.html", b"text/html; charset=utf-8"),
    "app.js": ("app.js", b"text/javascript; charset=utf-8"),
    "style.css": ("style.css", b"text/css; charset=utf-8"),
}
# Everything the page loads comes from this node; nothing inline, no frames.
SECURITY_HEADERS = {
    b"content-security-policy": b"default-src 'self'; img-src 'self' data:; "
    b"frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
    b"cache-control": b"no-cache",
}


@cache
def _read(name: str) -> bytes:
    return files("dache.web").joinpath("console", name).read_bytes()


def is_console(path: bytes) -> bool:
    return path == PATH or path.startswith(PATH + b"/")


def answer(request: IRequest) -> bytes | None:
    """The console file `request` asks for; None when there is no such file."""
    path = request.path
    if path == PATH:  # relative URLs in the page need the slash
        request.setResponseCode(301)
        request.setHeader(b"location", PATH + b"/")
        return b""
    found = FILES.get(path[len(PATH) + 1 :].decode("utf-8", "replace"))
    if found is None:
        return None
    name, content_type = found
    request.setHeader(b"content-type", content_type)
    for header, value in SECURITY_HEADERS.items():
        request.setHeader(header, value)
    return _read(name)


@DacheAPI.app.route("/ui", methods=["GET", "HEAD"])
@DacheAPI.app.route("/ui/", methods=["GET", "HEAD"])
@DacheAPI.app.route("/ui/<name>", methods=["GET", "HEAD"])
def console(api: DacheAPI, request: IRequest, name: str = "") -> bytes:
    body = answer(request) if api.ui_enabled else None
    if body is None:
        raise APIError(404, "no such file" if api.ui_enabled else "the web console is off (UI)")
    return body
