"""
`python -m dache.healthcheck`: probe this node's liveness route, for a
container's HEALTHCHECK. Exits 0 if it answers 2xx, else 1 with one line on
stderr.

It reads the same environment as the node (LISTEN, else PORT), so the probe
follows a changed port, a TLS endpoint (certificate not checked: it is our own
node on loopback) or a unix socket, with nothing but the standard library.
"""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import sys
from collections.abc import Mapping

from dache.config import ConfigError, resolve

PATH = "/health/live"  # liveness: never asks the engine, so an outage restarts nothing
TIMEOUT = 3.0


def _fields(description: str) -> tuple[str, list[str], dict[str, str]]:
    """Split a Twisted endpoint description ("tcp:8080:interface=::1", with
    backslash-escaped colons) into its kind, positional and keyword fields."""
    fields, current, escaped = [], "", False
    for char in description:
        if escaped:
            current, escaped = current + char, False
        elif char == "\\":
            escaped = True
        elif char == ":":
            fields.append(current)
            current = ""
        else:
            current += char
    fields.append(current)
    if fields[0].isdigit():  # a bare port number means tcp
        fields.insert(0, "tcp")
    kind, args, kwargs = fields[0], [], {}
    for field in fields[1:]:
        name, equals, value = field.partition("=")
        if equals:
            kwargs[name] = value
        else:
            args.append(field)
    return kind, args, kwargs


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def connection(description: str, timeout: float = TIMEOUT) -> http.client.HTTPConnection:
    """An HTTP(S) connection to the node serving on endpoint `description`."""
    kind, args, kwargs = _fields(description)
    if kind == "unix":
        return _UnixConnection(kwargs.get("address", args[0] if args else ""), timeout)
    if kind not in ("tcp", "tcp6", "ssl"):
        raise ValueError(f"cannot probe a {kind!r} endpoint")
    port = int(kwargs.get("port", args[0] if args else "0"))
    host = kwargs.get("interface", "")
    if host == "::" or (kind == "tcp6" and not host):
        host = "::1"  # listening on every interface: probe loopback
    elif host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    if kind == "ssl":
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
    return http.client.HTTPConnection(host, port, timeout=timeout)


def probe(environ: Mapping[str, str]) -> str | None:
    """None if the node is live; otherwise what is wrong, in one line."""
    try:
        config = resolve({}, environ)
        description = config.listen or f"tcp:{config.port}"
        conn = connection(description)
        conn.request("GET", PATH)
        response = conn.getresponse()
        response.read()
        conn.close()
    except (ConfigError, ValueError, OSError, http.client.HTTPException) as e:
        return f"{PATH} did not answer: {e}"
    if not 200 <= response.status < 300:
        return f"{PATH} answered {response.status}"
    return None


def main() -> int:
    problem = probe(os.environ)
    if problem is not None:
        sys.stderr.write(f"dache: unhealthy: {problem}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
