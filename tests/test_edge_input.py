"""
Bad input is always a 4xx with a JSON error, and values round-trip byte for
byte: checked against a real `twistd dache` over a real socket.
"""

from __future__ import annotations

import json

import pytest

from tests.process import DacheProcess


@pytest.fixture(scope="module")
def node():
    process = DacheProcess(env={"DURABILITY_ENGINE": "memory"})
    process.start()
    yield process
    process.stop()


def post(node, key: str, body: bytes):
    return node.request("POST", "/dache/" + key, body)


def stored_text(node, key: str) -> bytes:
    status, _, body = node.request("GET", "/dache/" + key)
    assert status == 200, body
    prefix = b'{"key":%b,"value":' % json.dumps(key).encode()
    assert body.startswith(prefix) and body.endswith(b"}")
    return body[len(prefix) : -1]


@pytest.mark.parametrize(
    "value",
    [
        b"1e-400",
        b"-0",
        b"1.10",
        b"1E+2",
        b"9" * 5000,  # past the interpreter's int-string limit
        b'"\\u00e9 \\/ \\"q\\""',
        b'{"b": 1,  "a": [1, 2]}',
        b"[" * 256 + b"]" * 256,  # the deepest nesting accepted
        '"é 中文"'.encode(),
    ],
)
def test_values_round_trip_byte_for_byte(node, value):
    assert post(node, "v", b'{"value": %b }' % value)[0] == 204
    assert stored_text(node, "v") == value


@pytest.mark.parametrize(
    "body, message",
    [
        (b'{"value": 1, "expiry": %b}' % (b"9" * 5000), '"expiry" must be a finite number'),
        (b'{"value": 1, "ttl": %b}' % (b"9" * 5000), '"ttl" must be a finite number'),
        (b'{"value": %b}' % (b"[" * 257 + b"]" * 257), "nested more than 256 levels"),
        (b'{"value": %b}' % (b"[" * 100_000), "nested more than 256 levels"),
        (b'{"value": "\\ud800"}', "lone UTF-16 surrogate"),
        (b'{"value": NaN}', "NaN is not a JSON number"),
        (b'{"value": 1e999999}', None),  # valid JSON text: stored as sent
        (b'{"value": 1,}', "body is not valid JSON"),
        (b'{"value": 1} x', "body is not valid JSON"),
        (b'{"\\ud800": 1}', 'unknown field "\\ud800"'),
        (b"[1]", "body must be a JSON object"),
        (b"\xff", "not valid UTF-8"),
    ],
)
def test_bad_bodies_get_400_and_change_nothing(node, body, message):
    assert post(node, "bad", b'{"value": "before"}')[0] == 204
    status, headers, answer = post(node, "bad", body)
    if message is None:
        assert status == 204
        return
    assert status == 400, answer
    assert headers["Content-Type"] == "application/json"
    assert message in json.loads(answer)["error"]
    assert stored_text(node, "bad") == b'"before"'


def test_no_bad_input_left_a_traceback(node):
    # Runs after the cases above, on the same node.
    assert post(node, "x", b'{"value": %b}' % (b"1" * 4301))[0] == 204
    assert "Traceback" not in node.output()
    assert "unexpected error" not in node.output()
