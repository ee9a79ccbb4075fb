"""End to end: `twistd -n dache` as a subprocess, over a real socket."""

import json
import os
import socket
import subprocess

from tests.process import TWISTD

MEMORY = {"DURABILITY_ENGINE": "memory"}


def test_serves_the_api_over_a_real_socket_and_stops_cleanly_on_sigterm(dache_process):
    node = dache_process(env=MEMORY)
    assert node.set("a/b c", {"n": [1, 2]}, ttl=3600) == 204
    status, body = node.get("a/b c")
    assert status == 200 and body["value"] == {"n": [1, 2]} and body["key"] == "a/b c"
    assert node.delete("a/b c") == 204
    assert node.get("a/b c")[0] == 404
    status, headers, raw = node.request("POST", "/dache/k", b'{"valu": 1}')
    assert status == 400 and "valu" in json.loads(raw)["error"]

    assert node.terminate() == 0
    output = node.output()
    assert "dache stopped" in output
    assert "Traceback" not in output


def test_an_oversized_body_is_refused_and_the_server_stays_healthy(dache_process):
    node = dache_process(env={**MEMORY, "MAX_VALUE_BYTES": "1000"})
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as connection:
        connection.sendall(
            b"POST /dache/big HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n"
        )
        answer = connection.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413")
    assert node.set("small", "fits") == 204
    assert node.get("small")[1]["value"] == "fits"


def test_the_port_setting_and_its_option(dache_process, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # --port wins over PORT, and without LISTEN dache serves on all interfaces.
    node = dache_process(env={**MEMORY, "PORT": "1"}, args=[f"--port={port}"], ephemeral_port=False)
    assert node.port == port
    assert f"listening on tcp:0.0.0.0:{port}" in node.output()
    assert node.set("k", 1) == 204


def run_twistd(*args, env=None):
    return subprocess.run(
        [TWISTD, "-n", "--pidfile=", "dache", *args],
        env={**os.environ, **MEMORY, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_bad_settings_stop_start_up_with_one_line():
    cases = [
        ({"PORT": "eighty"}, "PORT must be an integer"),
        ({"DURABILITY_ENGINE": "mongo"}, "DURABILITY_ENGINE must be one of"),
        ({"LISTEN": "carrier-pigeon:1"}, "LISTEN is not a valid server endpoint"),
    ]
    for env, message in cases:
        result = run_twistd(env=env)
        assert result.returncode != 0
        lines = (result.stdout + result.stderr).strip().splitlines()
        assert len(lines) == 1, lines
        assert message in lines[0]
        assert "Traceback" not in lines[0]


def test_help_documents_every_option_and_its_environment_variable():
    result = run_twistd("--help")
    assert result.returncode == 0
    for name in ("--port", "[PORT]", "--durability-engine", "[DURABILITY_ENGINE]", "--listen"):
        assert name in result.stdout
