"""
The servers under load, each a subprocess pinned to the server core:
dache (`twistd -n dache`), the ceiling (bench/ceiling.py) and etcd.

Every server listens on 127.0.0.1 only, keeps its data in a temp dir, and is
stopped by the harness (SIGTERM, then SIGKILL after a deadline).
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping

SERVER_CPU = 0  # the core every server is pinned to
LOAD_CPU = 1  # the core wrk is pinned to
BIN = os.path.dirname(sys.executable)
LISTENING = re.compile(r"listening on tcp:[^:]+:(\d+)")


def pinned(cpu: int, command: list[str]) -> list[str]:
    """The command run on one core (taskset), when the machine has that core."""
    if shutil.which("taskset") and cpu < (os.cpu_count() or 1):
        return ["taskset", "-c", str(cpu), *command]
    return command


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess whose output is kept, found listening by a log line or a probe."""

    def __init__(
        self,
        name: str,
        command: list[str],
        env: Mapping[str, str] | None = None,
        cpu: int | None = SERVER_CPU,
    ):
        self.name = name
        # cpu None: the whole machine (the scheduler's choice)
        self.command = command if cpu is None else pinned(cpu, command)
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self.port: int | None = None
        self.lines: list[str] = []
        self._listening = threading.Event()

    def start(self, timeout: float = 60.0) -> Server:
        self.proc = subprocess.Popen(
            self.command,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._read_output, daemon=True).start()
        self.wait_ready(timeout)
        return self

    def _read_output(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            match = LISTENING.search(line)
            if match and self.port is None:
                self.port = int(match.group(1))
                self._listening.set()

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._listening.wait(0.05):
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited before listening:\n{self.output()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not listen in time:\n{self.output()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def cpu_pids(self) -> tuple[int, ...]:
        """The processes whose CPU time (with their children's) is the server's."""
        return (self.pid,)

    def rss_bytes(self) -> int:
        """Resident set size of the server (taskset execs it, so the pid is its own)."""
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS for {self.name}")

    def output(self) -> str:
        return "\n".join(self.lines[-40:])

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def request(
        self, method: str, path: str, body: bytes | None = None, timeout: float = 10.0
    ) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()


def dache(name: str, env: Mapping[str, str] | None = None, cpu: int | None = SERVER_CPU) -> Server:
    """`twistd -n dache` on an ephemeral loopback port."""
    command = [
        os.path.join(BIN, "twistd"),
        "-n",
        "--pidfile=",
        "dache",
        "--listen=tcp:0:interface=127.0.0.1",
    ]
    return Server(name, command, env, cpu=cpu)


def ceiling(value_bytes: int) -> Server:
    command = [sys.executable, "-m", "bench.ceiling", "--value-bytes", str(value_bytes)]
    return Server(f"ceiling-{value_bytes}", command)


class Etcd(Server):
    """A single etcd node on loopback; ready once its v3 gateway answers."""

    def __init__(self, data_dir: str):
        self.client_port = free_port()
        peer_port = free_port()
        client = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{peer_port}"
        command = [
            shutil.which("etcd") or "etcd",
            "--name=bench",
            f"--data-dir={data_dir}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=bench={peer}",
            "--logger=zap",
            "--log-level=error",
        ]
        super().__init__("etcd", command)

    def wait_ready(self, timeout: float) -> None:
        self.port = self.client_port
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited before listening:\n{self.output()}")
            try:
                status, _ = self.request("POST", "/v3/kv/range", b'{"key":"AA=="}', timeout=1)
                if status == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"etcd did not answer in time:\n{self.output()}")
            time.sleep(0.1)
