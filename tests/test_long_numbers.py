"""
Every number a request carries that reaches int() on its way in -- the
Content-Length (twisted.web's parser), a chunk size (its chunked decoder),
an ETag in If-Match / If-None-Match, Last-Event-ID, and the since, revision,
wait and limit parameters -- sent 5,001 digits long, past the interpreter's
4,300-digit int() limit, on a raw socket to a real `twistd dache`: each gets
a JSON answer, and the node logs one line for it (the access log's), never a
traceback.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from tests.process import DacheProcess

DIGITS = b"7" * 5001


@pytest.fixture(scope="module")
def node():
    process = DacheProcess(env={"DURABILITY_ENGINE": "memory", "ACCESS_LOG": "true"})
    process.start()
    assert process.set("k", "v") == 204
    yield process
    process.stop()


def exchange(port: int, raw: bytes, then: bytes = b"") -> bytes:
    """Send `raw` (and `then`, unless the server has answered), read until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(raw)
        if then:
            try:
                s.sendall(then)
            except (BrokenPipeError, ConnectionResetError):
                pass  # answered and closed meanwhile
        s.shutdown(socket.SHUT_WR)
        answer = b""
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
    return answer


def _logged_through(node: DacheProcess) -> int:
    """Send a marker request; once its access line is in, how many lines the node wrote."""
    marker = f"/dache/marker-{time.monotonic_ns()}"
    node.request("GET", marker)
    deadline = time.monotonic() + 10
    while True:
        lines = list(node.lines)
        for number, line in enumerate(lines):
            if marker in line:
                return number
        assert time.monotonic() < deadline, node.output()[-2000:]
        time.sleep(0.02)


def lines_for(node: DacheProcess, send) -> tuple[bytes, list[str]]:
    """What `send` got back, and the log lines the node wrote for it."""
    before = _logged_through(node) + 1
    answer = send()
    after = _logged_through(node)  # the node logs in order: the bad request's came first
    return answer, node.lines[before:after]


def json_error(answer: bytes) -> tuple[int, str]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), answer[:500]
    return int(head.split(b" ")[1]), json.loads(body[: body.index(b"}") + 1])["error"]


HEAD = b"POST /dache/k HTTP/1.1\r\nHost: d\r\n"


@pytest.mark.parametrize(
    "raw, then, status, message",
    [
        # twisted.web's Content-Length: int() would raise ValueError from its parser
        (HEAD + b"Content-Length: " + DIGITS + b"\r\n\r\n", b"", 400, "Content-Length"),
        (HEAD + b"Content-Length: " + b"9" * 4300 + b"\r\n\r\n", b"", 413, "limit"),
        (HEAD + b"content-length:" + DIGITS + b"\r\n\r\n", b"", 400, "Content-Length"),
        (HEAD + b"Content-Length: 5000000000\r\n\r\n", b"", 413, "limit"),
        # a chunk size: int(..., 16) has no digit limit; the body bound answers
        (
            HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + b"f" * 1000 + b"\r\n",
            b"x" * (1024 * 1024 + 1),
            413,
            "limit",
        ),
        # a chunk-size line over twisted.web's 1,024 bytes: malformed
        (
            HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + b"f" * 5001 + b"\r\n",
            b"",
            400,
            "malformed",
        ),
    ],
    ids=["content-length", "4300 digits", "lower case", "10 digits", "chunk size", "chunk line"],
)
def test_a_long_number_in_the_framing_gets_a_json_answer(node, raw, then, status, message):
    answer, logged = lines_for(node, lambda: exchange(node.port, raw, then))
    assert json_error(answer)[0] == status, answer[:300]
    assert message in json_error(answer)[1]
    assert len(logged) == 1, logged  # the access line, nothing else
    assert f" {status} " in logged[0]
    assert node.get("k") == (200, {"key": "k", "value": "v"})  # nothing changed


@pytest.mark.parametrize(
    "request_line, header, status, message",
    [
        (b"PUT /dache/k", b'If-Match: "' + DIGITS + b'"', 412, "precondition failed"),
        (b"DELETE /dache/k", b'If-Match: "' + DIGITS + b'"', 412, "precondition failed"),
        (b"GET /dache?watch=true", b"Last-Event-ID: " + DIGITS, 400, "Last-Event-ID"),
        (b"GET /dache?watch=true&since=" + DIGITS, b"X-A: a", 400, "since"),
        (b"GET /dache/k?wait=" + DIGITS, b"X-A: a", 400, "wait"),
        (b"GET /dache/k?wait=1&revision=" + DIGITS, b"X-A: a", 400, "revision"),
        (b"GET /dache?limit=" + DIGITS, b"X-A: a", 400, "limit"),
    ],
    ids=["if-match put", "if-match delete", "last-event-id", "since", "wait", "revision", "limit"],
)
def test_a_long_number_in_a_header_or_parameter_gets_a_json_error(
    node, request_line, header, status, message
):
    body = b'{"value": "w"}' if request_line.startswith(b"PUT") else b""
    raw = (
        request_line + b" HTTP/1.1\r\nHost: d\r\nConnection: close\r\n" + header + b"\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    answer, logged = lines_for(node, lambda: exchange(node.port, raw))
    assert json_error(answer) == (status, json_error(answer)[1])
    assert message in json_error(answer)[1]
    assert len(logged) == 1, logged
    assert node.get("k") == (200, {"key": "k", "value": "v"})


def test_a_long_if_none_match_is_a_tag_that_matches_nothing(node):
    raw = b'GET /dache/k HTTP/1.1\r\nHost: d\r\nConnection: close\r\nIf-None-Match: "%b"\r\n\r\n'
    answer, logged = lines_for(node, lambda: exchange(node.port, raw % DIGITS))
    assert answer.startswith(b"HTTP/1.1 200 OK")
    assert answer.endswith(b'{"key":"k","value":"v"}')
    assert len(logged) == 1, logged
    assert "Traceback" not in node.output()
