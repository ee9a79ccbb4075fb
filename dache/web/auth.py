"""
Access control: bearer tokens (RFC 6750) checked in one place, at the top of
the root resource, before any route runs.

With AUTH_TOKEN set, the rule is:

    /health, /health/*   open; a caller without a valid token sees only
                         {"status": ...} (and the HTTP status), no detail
    everything else      needs "Authorization: Bearer <token>"
                         (/dache/*, /metrics, unknown paths alike)
    writes               any method but GET/HEAD needs AUTH_TOKEN;
                         AUTH_READ_TOKEN gets 403 there

A missing or wrong token gets 401 with `WWW-Authenticate: Bearer` and a JSON
error. Tokens are compared as SHA-256 digests with hmac.compare_digest, so the
time taken says nothing about the token, not even its length. No token is
ever logged or echoed: errors name the setting, never its value.
"""

from __future__ import annotations

import hashlib
import hmac

from twisted.web.iweb import IRequest

from dache.config import Config, ConfigError
from dache.rendering import render_json
from dache.web import ui

READ_METHODS = frozenset((b"GET", b"HEAD"))
HEALTH = b"/health"
REALM = b'Bearer realm="dache"'


def _digest(token: str | bytes) -> bytes:
    if isinstance(token, str):
        token = token.encode("ascii")
    return hashlib.sha256(token).digest()


def _read_token_file(path: str, setting: str) -> str:
    try:
        with open(path, encoding="ascii") as f:
            token = f.read().strip()
    except OSError as e:
        raise ConfigError(f"{setting} cannot be read ({e.strerror}: {path!r})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{setting} must hold printable ASCII ({path!r})") from None
    if not token:
        raise ConfigError(f"{setting} is empty ({path!r})")
    if not all("!" <= c <= "~" for c in token):
        raise ConfigError(f"{setting} must hold one token without spaces ({path!r})")
    return token


def read_token_files(config: Config) -> Config:
    """
    Resolve AUTH_TOKEN_FILE / AUTH_READ_TOKEN_FILE into the tokens, and check
    the tokens make sense together. Raises ConfigError with one line.
    """
    tokens = {}
    for name in ("auth_token", "auth_read_token"):
        value = getattr(config, name, None)
        path = getattr(config, name + "_file", None)
        setting = name.upper()
        if value is not None and path is not None:
            raise ConfigError(f"set {setting} or {setting}_FILE, not both")
        if path is not None:
            value = _read_token_file(path, setting + "_FILE")
        tokens[name] = value
    if tokens["auth_read_token"] is not None:
        if tokens["auth_token"] is None:
            raise ConfigError("AUTH_READ_TOKEN needs AUTH_TOKEN (else writes would be open)")
        if tokens["auth_read_token"] == tokens["auth_token"]:
            raise ConfigError("AUTH_READ_TOKEN must differ from AUTH_TOKEN")
    return config.replace(auth_token_file=None, auth_read_token_file=None, **tokens)


class Access:
    """Who may do what, given the configured tokens."""

    def __init__(self, token: str, read_token: str | None = None):
        self._write = _digest(token)
        # With no read token, compare against a digest nothing hashes to.
        self._read = _digest(read_token) if read_token is not None else b"\0" * 32

    @classmethod
    def from_config(cls, config: Config) -> Access | None:
        """The Access for `config`, or None when access control is off."""
        config = read_token_files(config)
        if config.auth_token is None:
            return None
        return cls(config.auth_token, config.auth_read_token)

    def refuse(self, request: IRequest) -> bytes | None:
        """
        None if `request` may go on; otherwise set the status and headers
        of the refusal and return its body.
        """
        presented = _bearer(request)
        if presented is None:
            may_write = may_read = False
        else:
            digest = _digest(presented)
            # Both comparisons always run: no early exit to time.
            may_write = hmac.compare_digest(digest, self._write)
            may_read = hmac.compare_digest(digest, self._read) or may_write
        path = request.path
        if ui.is_console(path):
            return None  # static files, no data: the page asks for a token itself
        if path == HEALTH or path.startswith(HEALTH + b"/"):
            # Open, but the detail stays behind a token (dache.web.health.respond).
            request.health_detail = may_read
            return None
        if not may_read:
            challenge = REALM if presented is None else REALM + b', error="invalid_token"'
            message = (
                "this needs a token: send 'Authorization: Bearer <token>'"
                if presented is None
                else "the bearer token is not valid"
            )
            return _refusal(request, 401, challenge, message)
        if not may_write and request.method not in READ_METHODS:
            challenge = REALM + b', error="insufficient_scope"'
            return _refusal(request, 403, challenge, "this token may only read (GET/HEAD)")
        return None


def _bearer(request: IRequest) -> bytes | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    values = request.requestHeaders.getRawHeaders(b"authorization")
    if not values:
        return None
    scheme, _, token = values[0].strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    return token.strip() or None


def _refusal(request: IRequest, status: int, challenge: bytes, message: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"www-authenticate", challenge)
    request.setHeader(b"content-type", b"application/json")
    return render_json({"error": message})
