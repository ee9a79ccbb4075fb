"""dache's Site and Request, fed raw HTTP bytes over an in-memory transport."""

import json

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from dache.testing import MemoryNode
from dache.web.site import DacheSite


def connect(node, limit=100):
    site = DacheSite(node.api.resource(), max_body_bytes=limit)
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def response_body(raw: bytes) -> dict:
    return json.loads(raw.split(b"\r\n\r\n", 1)[1])


def test_an_oversized_body_is_refused_from_its_content_length_before_it_is_sent():
    node = MemoryNode()
    protocol, transport = connect(node)
    protocol.dataReceived(
        b"POST /dache/k HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000000\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    sent = transport.value()
    assert sent.startswith(b"HTTP/1.1 413 ")
    assert b"100 Continue" not in sent  # the client is told not to send the body
    assert b"application/json" in sent
    assert "100-byte" in response_body(sent)["error"]
    assert transport.disconnecting
    protocol.dataReceived(b"x" * 10_000)  # whatever still arrives is dropped
    assert len(node.cache) == 0


def test_an_oversized_chunked_body_is_refused_once_it_passes_the_limit():
    node = MemoryNode()
    protocol, transport = connect(node)
    protocol.dataReceived(
        b"POST /dache/k HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    body = json.dumps({"value": "x" * 200}).encode()
    protocol.dataReceived(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    assert transport.disconnecting
    assert len(node.cache) == 0


def test_a_body_within_the_limit_is_served_and_the_connection_kept():
    node = MemoryNode()
    protocol, transport = connect(node)
    body = b'{"value": "ok"}'
    protocol.dataReceived(
        b"POST /dache/k HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    assert transport.value().startswith(b"HTTP/1.1 204 ")
    assert not transport.disconnecting
    transport.clear()
    protocol.dataReceived(b"GET /dache/k HTTP/1.1\r\nHost: x\r\n\r\n")
    assert response_body(transport.value()) == {"key": "k", "value": "ok"}


def logged_requests(node, redact):
    from twisted.logger import Logger, formatEvent

    events = []
    site = DacheSite(node.api.resource(), access_log=True, redact_keys=redact)
    site.access_log = Logger(namespace="dache.access", observer=events.append)
    peer = IPv4Address("TCP", "127.0.0.1", 40000)
    protocol = site.buildProtocol(peer)
    transport = StringTransport(peerAddress=peer)
    protocol.makeConnection(transport)
    protocol.dataReceived(b"GET /dache/secret-key HTTP/1.1\r\nHost: x\r\n\r\n")
    return [formatEvent(e) for e in events]


def test_access_log_is_off_by_default():
    assert DacheSite(MemoryNode().api.resource()).log_requests is False


def test_access_log_lines_and_key_redaction():
    node = MemoryNode()
    [line] = logged_requests(node, redact=False)
    assert '"GET /dache/secret-key" 404' in line and "127.0.0.1" in line
    [line] = logged_requests(node, redact=True)
    assert "secret-key" not in line
    assert '"GET /dache/<redacted>" 404' in line


def test_an_unexpected_error_is_a_json_500_without_a_traceback():
    node = MemoryNode()
    node.api.cache = None  # any bug in a handler
    protocol, transport = connect(node)
    protocol.dataReceived(b"GET /dache/k HTTP/1.1\r\nHost: x\r\n\r\n")
    sent = transport.value()
    assert sent.startswith(b"HTTP/1.1 500 ")
    assert response_body(sent) == {"error": "internal error; see the server log"}
    assert b"Traceback" not in sent and b"NoneType" not in sent
