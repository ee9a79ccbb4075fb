"""
Protocol abuse replayed on a raw socket against a real `twistd dache`: the
bounds of dache/web/channel.py hold, and the node keeps answering others.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from tests.process import DacheProcess

BIG = 1_000_000  # bytes of the value the attacker asks for again and again
PIPELINED = 1000  # GETs sent without reading one answer (about 40 KB of requests)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def timed_get(port: int, path: str) -> float:
    """Seconds a fresh connection takes to get an answer to GET `path`."""
    began = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET %b HTTP/1.1\r\nHost: dache\r\nConnection: close\r\n\r\n" % path.encode())
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    return time.monotonic() - began


@pytest.fixture
def node():
    process = DacheProcess(
        env={
            "DURABILITY_ENGINE": "memory",
            "MAX_VALUE_BYTES": str(2 * BIG),
            "SEND_TIMEOUT": "3",
        }
    )
    process.start()
    yield process
    process.stop()


def test_pipelined_gets_never_read_keep_rss_flat_and_others_served(node):
    assert node.set("big", "x" * BIG) == 204
    assert node.get("big")[0] == 200  # the answer is rendered once: part of the baseline
    baseline = rss_bytes(node.proc.pid)

    attacker = socket.socket()
    attacker.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # reads nothing anyway
    attacker.connect(("127.0.0.1", node.port))
    request = b"GET /dache/big HTTP/1.1\r\nHost: dache\r\n\r\n"
    attacker.setblocking(False)
    pending = request * PIPELINED
    deadline = time.monotonic() + 10
    while pending and time.monotonic() < deadline:
        try:
            pending = pending[attacker.send(pending) :]
        except BlockingIOError:
            time.sleep(0.01)  # the node has stopped reading us: that is the point

    peak = baseline
    slowest = 0.0
    until = time.monotonic() + 2.0
    while time.monotonic() < until:
        slowest = max(slowest, timed_get(node.port, "/health/live"))
        peak = max(peak, rss_bytes(node.proc.pid))
    # Without the bound every answer is buffered: a GiB and more. With it,
    # the socket buffers plus one answer in flight.
    assert peak - baseline < 48 * 1024 * 1024, (baseline, peak)
    assert slowest < 1.0

    # The attacker, still not reading, is dropped once SEND_TIMEOUT (3 s)
    # passes, having been sent a small part of what it asked for.
    deadline = time.monotonic() + 20
    while "has not read its answers" not in node.output():
        assert time.monotonic() < deadline, "the attacker was never dropped"
        time.sleep(0.05)
    attacker.setblocking(True)
    attacker.settimeout(10)
    received = 0
    try:
        while chunk := attacker.recv(1 << 20):
            received += len(chunk)
    except ConnectionResetError:
        pass  # aborted: what the kernel still held is lost, as it should be
    attacker.close()
    assert received < PIPELINED * BIG // 10
    assert node.get("big")[0] == 200


def test_a_connection_over_max_connections_gets_a_json_503():
    process = DacheProcess(env={"DURABILITY_ENGINE": "memory", "MAX_CONNECTIONS": "2"})
    process.start()
    try:
        held = [socket.create_connection(("127.0.0.1", process.port)) for _ in range(2)]
        for s in held:  # both are served
            s.sendall(b"GET /health/live HTTP/1.1\r\nHost: dache\r\n\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
        with socket.create_connection(("127.0.0.1", process.port), timeout=10) as third:
            third.sendall(b"GET /health/live HTTP/1.1\r\nHost: dache\r\n\r\n")
            answer = b""
            while chunk := third.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 ")
        assert b"Retry-After: 1" in head
        assert "limit of 2 connections" in json.loads(body)["error"]
        held.pop().close()
        deadline = time.monotonic() + 10
        while True:  # the slot comes back once the server sees the close
            status, _, _ = process.request("GET", "/health/live")
            if status == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert status == 200
        for s in held:
            s.close()
    finally:
        process.stop()


# -- malformed framing, oversized lines, RFC 9110/9112 points: every refusal
# is a JSON answer through the Request, counted in /metrics


@pytest.fixture(scope="module")
def logged_node():
    process = DacheProcess(env={"DURABILITY_ENGINE": "memory", "ACCESS_LOG": "true"})
    process.start()
    assert process.set("k", "v") == 204
    yield process
    process.stop()


def exchange(port: int, raw: bytes, timeout: float = 10.0) -> tuple[bytes, dict, bytes]:
    """Send `raw`, read until the server closes or one answer is whole."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(raw)
        answer = b""
        while True:
            head, _, body = answer.partition(b"\r\n\r\n")
            if _ and b"content-length:" in head.lower():
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                if len(body) >= length:
                    break
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.split(b"\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines)}
    return status_line, headers, body


def status_of(line: bytes) -> int:
    return int(line.split(b" ")[1])


@pytest.mark.parametrize(
    "raw, status, message",
    [
        (b"NONSENSE\r\n\r\n", 400, "malformed request"),
        (b"GET /dache/k HTTP/1.1\r\nHost: d\r\nContent-Length: abc\r\n\r\n", 400, "malformed"),
        (b"GET /dache/k HTTP/1.1\r\nHost: d\r\nbad header\r\n\r\n", 400, "malformed"),
        (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: d\r\n\r\n", 414, "request line is over"),
        (b"GET /dache/k HTTP/1.1\r\nHost: d\r\nX: " + b"a" * 20000 + b"\r\n\r\n", 431, "header"),
        (
            b"GET /dache/k HTTP/1.1\r\nHost: d\r\n" + b"X-A: aaaaaaaaaaaaaaa\r\n" * 900 + b"\r\n",
            431,
            "header fields are over the limit",
        ),
        (b"GET /dache/k HTTP/1.1\r\n\r\n", 400, "needs a Host header"),
        (b"GET /dache/k HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "one Host header"),
        (b"get /dache/k HTTP/1.1\r\nHost: d\r\n\r\n", 405, "get is not allowed"),
        (b"get /health HTTP/1.1\r\nHost: d\r\n\r\n", 405, "get is not allowed"),
        (b"BREW /dache/k HTTP/1.1\r\nHost: d\r\n\r\n", 405, "BREW is not allowed"),
        (b"PATCH /health HTTP/1.1\r\nHost: d\r\n\r\n", 405, "not allowed"),
        (b"GET nowhere HTTP/1.1\r\nHost: d\r\n\r\n", 400, "request target"),
        (b"GET * HTTP/1.1\r\nHost: d\r\n\r\n", 400, "for OPTIONS only"),
        (b"GET /dache%2Fk HTTP/1.1\r\nHost: d\r\n\r\n", 404, "no such route"),
        (b"GET /health/\xff HTTP/1.1\r\nHost: d\r\n\r\n", 400, "malformed"),  # not ASCII
        (b"GET /health/%ff HTTP/1.1\r\nHost: d\r\n\r\n", 404, "no such route"),
        (b"GET /dache/%ff HTTP/1.1\r\nHost: d\r\n\r\n", 400, "not valid UTF-8"),
        (
            b"POST /dache/k HTTP/1.1\r\nHost: d\r\nContent-Encoding: gzip\r\n"
            b"Content-Length: 2\r\n\r\n{}",
            415,
            "Content-Encoding",
        ),
        (
            b"POST /dache/k HTTP/1.1\r\nHost: d\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            400,
            "malformed",
        ),
    ],
)
def test_protocol_refusals_are_json(logged_node, raw, status, message):
    status_line, headers, body = exchange(logged_node.port, raw)
    assert status_of(status_line) == status, (status_line, body)
    assert headers[b"content-type"] == b"application/json"
    assert message in json.loads(body)["error"]
    assert logged_node.get("k") == (200, {"key": "k", "value": "v"})  # nothing changed


def test_absolute_form_targets_are_served(logged_node):
    status_line, _, body = exchange(
        logged_node.port, b"GET http://dache:8080/dache/k HTTP/1.1\r\nHost: dache\r\n\r\n"
    )
    assert status_of(status_line) == 200
    assert json.loads(body)["value"] == "v"


def test_a_strong_if_match_compares_byte_for_byte(logged_node):
    status, headers, _ = logged_node.request("GET", "/dache/k")
    tag = headers["ETag"]  # '"<n>"'
    padded = '"0' + tag[1:]  # the same number, not the same tag
    body = b'{"value": "w"}'
    assert logged_node.request("PUT", "/dache/k", body, {"If-Match": padded})[0] == 412
    assert logged_node.request("PUT", "/dache/k", body, {"If-Match": tag})[0] == 204
    assert logged_node.set("k", "v") == 204


def test_refusals_are_counted_and_logged_without_query_strings(logged_node):
    for raw in (
        b"NONSENSE\r\n\r\n",
        b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: d\r\n\r\n",
        b"GET /dache/k HTTP/1.1\r\nHost: d\r\nX: " + b"a" * 20000 + b"\r\n\r\n",
    ):
        exchange(logged_node.port, raw)
    status, _, metrics = logged_node.request("GET", "/metrics")
    for code in ("400", "414", "431"):
        assert f'status="{code}"' in metrics.decode(), code
    status, _, _ = logged_node.request("GET", "/dache/k?token=s3cret-in-query")
    assert status == 200
    status, headers, body = logged_node.request("HEAD", "/dache/k?token=s3cret-in-query")
    assert status == 200 and body == b"" and headers["Content-Length"] != "0"
    deadline = time.monotonic() + 10
    while '"GET /dache/k?<redacted>" 200' not in logged_node.output():
        assert time.monotonic() < deadline, logged_node.output()[-2000:]
        time.sleep(0.05)
    output = logged_node.output()
    assert "s3cret" not in output
    assert "eat it" not in output  # Twisted's HEAD warning, which logged the URI
    assert '"- -" 414' in output
    assert "Traceback" not in output


def test_a_body_refused_from_its_content_length_still_gets_its_413():
    process = DacheProcess(env={"DURABILITY_ENGINE": "memory"})
    process.start()
    try:
        size = 80 * 1024 * 1024
        with socket.create_connection(("127.0.0.1", process.port), timeout=20) as s:
            s.sendall(b"POST /dache/big HTTP/1.1\r\nHost: d\r\nContent-Length: %d\r\n\r\n" % size)
            chunk = b"x" * (1 << 20)
            sent = 0
            while sent < size:  # a client that sends its whole body before reading
                s.sendall(chunk)
                sent += len(chunk)
            answer = b""
            while part := s.recv(65536):
                answer += part
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413 Content Too Large")
        assert "limit" in json.loads(body)["error"]
    finally:
        process.stop()
