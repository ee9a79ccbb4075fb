"""
The ceiling: the least a twisted.web server can do for dache's two hot
requests. Stock twisted.web Site and Request, on dache's Site settings (the
same idle timeout, access log off), a Resource without Klein.

    GET  anything -> 200, a constant JSON body shaped like a dache entry
    POST anything -> parse the JSON body into a dict, 204

    python -m bench.ceiling [--port 0] [--value-bytes 100]

Prints "listening on tcp:127.0.0.1:<port>" once it accepts connections (the
same line dache logs, so the harness finds both ports the same way).
"""

from __future__ import annotations

import argparse
import json
import sys

from twisted.internet import endpoints, reactor
from twisted.web.resource import Resource
from twisted.web.server import Site

JSON = b"application/json"


class CeilingSite(Site):
    """twisted.web's Site with the access log off, as dache's is by default."""

    noisy = False

    def log(self, request) -> None:
        pass


class CeilingResource(Resource):
    isLeaf = True

    def __init__(self, body: bytes):
        super().__init__()
        self.body = body

    def render_GET(self, request):
        request.setHeader(b"content-type", JSON)
        return self.body

    def render_POST(self, request):
        document = json.loads(request.content.read())
        if not isinstance(document, dict):
            request.setResponseCode(400)
            return b'{"error":"not an object"}'
        request.setResponseCode(204)
        return b""


def constant_body(value_bytes: int) -> bytes:
    """A GET body like dache's for a key "k" and a string value of value_bytes."""
    value = "x" * max(value_bytes - 2, 0)
    return b'{"key":"k","value":' + json.dumps(value).encode() + b"}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--value-bytes", type=int, default=100)
    args = parser.parse_args(argv)

    # dache's Site settings: no form parsing of POST bodies (see dache.web.site).
    site = CeilingSite(
        CeilingResource(constant_body(args.value_bytes)), parsePOSTFormSubmission=False
    )
    endpoint = endpoints.TCP4ServerEndpoint(reactor, args.port, interface="127.0.0.1")

    def listening(port) -> None:
        sys.stdout.write(f"listening on tcp:127.0.0.1:{port.getHost().port}\n")
        sys.stdout.flush()

    endpoint.listen(site).addCallback(listening)
    reactor.run()


if __name__ == "__main__":
    main()
