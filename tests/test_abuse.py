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
