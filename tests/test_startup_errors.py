"""Start-up errors a user makes are one line, no traceback (a real twistd)."""

from __future__ import annotations

import socket

import pytest

from tests.process import DacheProcess


def failed_start(listen: str) -> str:
    process = DacheProcess(env={"DURABILITY_ENGINE": "memory"}, args=(f"--listen={listen}",))
    process.start(wait=False)
    try:
        assert process.wait_exit(30) != 0
        return process.output()
    finally:
        process.stop()


def test_a_port_in_use_is_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        output = failed_start(f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1")
    assert "dache could not start: Couldn't listen on 127.0.0.1" in output
    assert "Address already in use" in output
    assert "Traceback" not in output


@pytest.mark.parametrize("path", ["/nonexistent-dir/dache.sock"])
def test_a_bad_unix_socket_path_is_one_line(path):
    output = failed_start(f"unix:{path}")
    assert "dache could not start: Couldn't listen on" in output
    assert "Traceback" not in output
