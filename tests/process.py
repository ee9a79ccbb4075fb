"""
Run `twistd -n dache` as a subprocess and talk to it over a real socket.

The node listens on an ephemeral port (`--listen tcp:0:interface=127.0.0.1`)
and reports it on its "listening on" log line (text, or the message of a
LOG_FORMAT=json line), so tests never race for ports.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
LISTENING = re.compile(r"listening on tcp:[^:]+:(\d+)")


def _message(line: str) -> str:
    """A log line's text: the "message" of a LOG_FORMAT=json line, else the line."""
    if line.startswith("{"):
        try:
            return str(json.loads(line).get("message", ""))
        except ValueError:
            pass
    return line


class DacheProcess:
    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        args: tuple[str, ...] = (),
        ephemeral_port: bool = True,
    ):
        self.env = {**os.environ, **(env or {})}
        self.own_disk_path: str | None = None
        if "DISK_PATH" not in (env or {}):
            # The disk engine is the default: never write the checkout's ./dache-data.
            self.own_disk_path = tempfile.mkdtemp(prefix="dache-test-")
            self.env["DISK_PATH"] = self.own_disk_path
        self.args = args
        self.ephemeral_port = ephemeral_port
        self.proc: subprocess.Popen[str] | None = None
        self.port: int | None = None
        self.lines: list[str] = []
        self._listening = threading.Event()

    # -- lifecycle

    def command(self) -> list[str]:
        command = [TWISTD, "-n", "--pidfile=", "dache"]
        if self.ephemeral_port and not any(a.startswith("--listen") for a in self.args):
            command.append("--listen=tcp:0:interface=127.0.0.1")
        return command + list(self.args)

    def start(self, timeout: float = 30.0, wait: bool = True, **popen: Any) -> DacheProcess:
        self.proc = subprocess.Popen(
            self.command(),
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            **popen,
        )
        self._reader = threading.Thread(target=self._read_output, daemon=True)
        self._reader.start()
        if wait:
            self.wait_listening(timeout)
        return self

    def _read_output(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            match = LISTENING.search(_message(line))
            if match and self.port is None:
                self.port = int(match.group(1))
                self._listening.set()

    def wait_listening(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self._listening.wait(0.05):
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError("dache exited before listening:\n" + self.output())
            if time.monotonic() > deadline:
                raise RuntimeError("dache did not start listening in time:\n" + self.output())

    def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        self._reader.join(timeout)  # every line the process wrote is in self.lines
        return code

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        """Make sure the process is gone (for fixture teardown)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self.own_disk_path is not None:
            shutil.rmtree(self.own_disk_path, ignore_errors=True)

    def output(self) -> str:
        return "\n".join(self.lines)

    def json_lines(self) -> list[dict[str, Any]]:
        """The output under LOG_FORMAT=json: one object per line (ValueError if not)."""
        return [json.loads(line) for line in list(self.lines)]

    # -- HTTP

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
    ) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request(method, path, body=body, headers=dict(headers or {}))
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def set(self, key: str, value: Any, **fields: Any) -> int:
        body = json.dumps({"value": value, **fields}).encode()
        return self.request("POST", "/dache/" + quote(key, safe=""), body)[0]

    def get(self, key: str) -> tuple[int, Any]:
        status, _, body = self.request("GET", "/dache/" + quote(key, safe=""))
        return status, json.loads(body) if body else None

    def delete(self, key: str) -> int:
        return self.request("DELETE", "/dache/" + quote(key, safe=""))[0]
