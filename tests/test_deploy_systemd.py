"""
Running under systemd (deploy/dache.service, deploy/dache.socket, dache/systemd.py):

- Type=notify: READY=1 only once the cache is loaded and the port listens,
  STOPPING=1 when shutdown begins, WATCHDOG=1 at half WATCHDOG_USEC. The
  tests bind a unix datagram socket and name it in NOTIFY_SOCKET, as systemd does.
- socket activation: a listening socket handed over as fd 3 with
  LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES, as systemd does, served by
  --listen systemd:domain=INET:index=0, and held across a restart.
- the unit files agree with the code, and `systemd-analyze verify` accepts them.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

import dache.service
from dache.config import SETTINGS, default_config
from dache.engines import Change
from dache.engines.memory import MemoryEngine
from dache.service import DacheService
from dache.systemd import SystemdNotifier, notify_address, watchdog_interval
from tests.process import TWISTD, DacheProcess

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


class NotifySocket:
    """What systemd listens on: a unix datagram socket, named as NOTIFY_SOCKET wants."""

    def __init__(self, abstract: bool = False):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"dache-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + name)
            self.env = "@" + name
        else:
            # Short path: unix socket names are limited to ~100 bytes.
            self._dir = tempfile.mkdtemp(prefix="dache-")
            self.env = os.path.join(self._dir, "notify")
            self.sock.bind(self.env)

    def pending(self) -> list[str]:
        """Messages received so far, without waiting."""
        messages = []
        self.sock.setblocking(False)
        try:
            while True:
                messages.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            return messages

    def wait_for(self, prefix: str, timeout: float = 30.0) -> tuple[str, list[str]]:
        """The first message starting with `prefix`, and every message before it."""
        self.sock.setblocking(True)
        self.sock.settimeout(timeout)
        before = []
        while True:
            message = self.sock.recv(4096).decode()
            if message.startswith(prefix):
                return message, before
            before.append(message)

    def close(self) -> None:
        self.sock.close()
        if hasattr(self, "_dir"):
            shutil.rmtree(self._dir, ignore_errors=True)


@pytest.fixture
def notify_socket():
    sockets = []

    def make(abstract: bool = False) -> NotifySocket:
        sockets.append(NotifySocket(abstract))
        return sockets[-1]

    yield make
    for s in sockets:
        s.close()


# -- the protocol's few rules


def test_notify_socket_names_a_path_or_an_abstract_socket():
    assert notify_address({}) is None
    assert notify_address({"NOTIFY_SOCKET": "/run/systemd/notify"}) == "/run/systemd/notify"
    assert notify_address({"NOTIFY_SOCKET": "@abstract"}) == "\0abstract"


def test_the_watchdog_pings_at_half_its_timeout_and_only_for_this_process():
    assert watchdog_interval({}, 42) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, 42) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}, 42) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, 42) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, 42) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}, 42) is None


def test_nothing_is_sent_outside_systemd():
    assert SystemdNotifier.from_environ(Clock(), {}) is None


def test_the_notify_variables_are_taken_out_of_the_environment_so_workers_stay_quiet(
    notify_socket, monkeypatch
):
    systemd = notify_socket()
    monkeypatch.setenv("NOTIFY_SOCKET", systemd.env)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = SystemdNotifier.from_environ(Clock())
    assert (notifier.address, notifier.watchdog) == (systemd.env, 15.0)
    assert not {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"} & set(os.environ)
    notifier.close()


def test_watchdog_pings_follow_the_clock_from_the_start(notify_socket):
    systemd = notify_socket(abstract=True)
    clock = Clock()
    notifier = SystemdNotifier.from_environ(
        clock, {"NOTIFY_SOCKET": systemd.env, "WATCHDOG_USEC": "10000000"}
    )
    starting = SimpleNamespace(ready=Deferred())  # a node still loading
    notifier.follow(starting)
    assert systemd.pending() == ["WATCHDOG=1"]
    clock.advance(4.9)
    assert systemd.pending() == []
    clock.advance(0.1)
    clock.advance(5)
    assert systemd.pending() == ["WATCHDOG=1", "WATCHDOG=1"]
    notifier.close()


def test_a_failed_start_reports_a_status_and_no_readiness(notify_socket):
    systemd = notify_socket()
    notifier = SystemdNotifier.from_environ(Clock(), {"NOTIFY_SOCKET": systemd.env})
    starting = SimpleNamespace(ready=Deferred())
    notifier.follow(starting)
    starting.ready.addErrback(lambda failure: None)
    starting.ready.errback(RuntimeError("engine down"))
    assert systemd.pending() == ["STATUS=dache could not start; see its log"]
    notifier.close()


def test_a_vanished_notify_socket_is_logged_not_fatal(notify_socket):
    systemd = notify_socket()
    notifier = SystemdNotifier.from_environ(Clock(), {"NOTIFY_SOCKET": systemd.env})
    systemd.close()
    assert notifier.send("READY=1") is False
    notifier.close()


# -- READY=1 waits for loading and listening


class GatedEngine(MemoryEngine):
    """A memory engine whose load finishes when the test says so."""

    def __init__(self):
        self.gate: Deferred[None] = Deferred()

    def load(self, apply):
        def loaded(_):
            apply(Change.set("loaded", b'"yes"'))

        return self.gate.addCallback(loaded)


@pytest_twisted.ensureDeferred
async def test_ready_is_sent_only_after_the_cache_is_loaded_and_the_port_listens(
    notify_socket, monkeypatch
):
    systemd = notify_socket()
    monkeypatch.setenv("NOTIFY_SOCKET", systemd.env)
    engine = GatedEngine()
    monkeypatch.setattr(dache.service, "create_engine", lambda config, reactor: engine)
    node = DacheService(default_config(listen="tcp:0:interface=127.0.0.1"), reactor)
    node.startService()
    try:
        # Start-up ran as far as it can: it waits for the load.
        assert systemd.pending() == []  # still loading: not ready
        assert node.port is None

        engine.gate.callback(None)
        await node.ready
        message, before = systemd.wait_for("READY=1", timeout=5)
        assert before == []
        port = node.port.getHost().port
        assert message == f"READY=1\nSTATUS=serving 1 entries on {port}"
        # The port systemd was told about accepts connections.
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        await node.stopService()
    assert systemd.pending() == ["STOPPING=1\nSTATUS=stopping"]


def test_a_node_under_systemd_notifies_ready_watchdog_and_stopping(notify_socket, dache_process):
    systemd = notify_socket(abstract=True)
    node = dache_process(env={"NOTIFY_SOCKET": systemd.env, "WATCHDOG_USEC": "400000"}, wait=False)
    ready, before = systemd.wait_for("READY=1")
    port = int(re.search(r"on (\d+)$", ready).group(1))
    # Ready means serving: the very next request is answered.
    node.port = port
    assert node.request("GET", "/health")[0] == 200
    assert all(message == "WATCHDOG=1" for message in before)
    systemd.wait_for("WATCHDOG=1", timeout=5)  # and it keeps pinging (every 0.2s)
    node.proc.send_signal(signal.SIGTERM)
    systemd.wait_for("STOPPING=1", timeout=10)
    assert node.wait_exit() == 0
    assert "dache stopped" in node.output()


# -- socket activation

# What systemd does between fork and exec: put the socket at fd 3 and describe
# it in LISTEN_* -- LISTEN_PID being the pid of the process that is exec'd.
ACTIVATE = """
import os, sys
fd = int(sys.argv[1])
os.dup2(fd, 3)
os.close(fd)
os.environ.update(LISTEN_FDS="1", LISTEN_FDNAMES="dache.socket", LISTEN_PID=str(os.getpid()))
os.execv(sys.argv[2], sys.argv[2:])
"""


class ActivatedProcess(DacheProcess):
    """A `twistd -n dache` started as systemd starts a socket-activated service."""

    def __init__(self, listening: socket.socket, env=None):
        super().__init__(env, ("--listen=systemd:domain=INET:index=0",))
        self.listening = listening

    def command(self) -> list[str]:
        fd = str(self.listening.fileno())
        return [sys.executable, "-c", ACTIVATE, fd, TWISTD, "-n", "--pidfile=", "dache", *self.args]

    def start(self, timeout: float = 30.0, wait: bool = True) -> ActivatedProcess:
        return super().start(timeout, wait, pass_fds=(self.listening.fileno(),))


@pytest.fixture
def held_socket():
    """A listening socket, as dache.socket has systemd hold one."""
    listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listening.bind(("127.0.0.1", 0))
    listening.listen(64)
    yield listening
    listening.close()


def test_a_socket_activated_node_serves_the_socket_it_is_given(held_socket):
    port = held_socket.getsockname()[1]
    node = ActivatedProcess(held_socket).start()
    try:
        assert node.port == port  # it adopted our socket rather than opening its own
        assert node.set("k", "via systemd") == 204
        assert node.get("k") == (200, {"key": "k", "value": "via systemd"})
    finally:
        node.stop()


def test_clients_wait_rather_than_being_refused_while_a_node_restarts(held_socket):
    port = held_socket.getsockname()[1]
    first = ActivatedProcess(held_socket).start()
    try:
        assert first.request("GET", "/health")[0] == 200
        assert first.terminate() == 0
    finally:
        first.stop()
    # No node runs now, but the port is still held: the connection is accepted
    # into the backlog and the request waits for the next node.
    client = socket.create_connection(("127.0.0.1", port), timeout=30)
    client.sendall(b"GET /health HTTP/1.1\r\nHost: dache\r\nConnection: close\r\n\r\n")
    second = ActivatedProcess(held_socket).start()
    try:
        answer = b""
        while chunk := client.recv(4096):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 ")
    finally:
        client.close()
        second.stop()


# -- the unit files


def unit(name: str) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit file as {section: [(key, value), ...]} (keys may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in (DEPLOY / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [v for k, v in section if k == key]


def test_the_service_unit_runs_twistd_as_a_hardened_notify_service():
    service = unit("dache.service")["Service"]
    (exec_start,) = values(service, "ExecStart")
    assert exec_start.endswith("/twistd -n --pidfile= dache")
    assert values(service, "Type") == ["notify"]
    assert values(service, "EnvironmentFile") == ["-/etc/dache/dache.env"]
    for key, value in [
        ("DynamicUser", "yes"),
        ("StateDirectory", "dache"),
        ("ProtectSystem", "strict"),
        ("NoNewPrivileges", "yes"),
        ("Restart", "on-failure"),
    ]:
        assert values(service, key) == [value], key
    environment = dict(v.split("=", 1) for v in values(service, "Environment"))
    # The disk engine's data lives in the state directory systemd makes.
    assert environment["DISK_PATH"] == "/var/lib/" + values(service, "StateDirectory")[0]
    assert environment["LISTEN"] == "systemd:domain=INET:index=0"
    # Every variable it sets is one of dache's settings (or Python's own).
    known = {s.env for s in SETTINGS} | {"PYTHONUNBUFFERED"}
    assert set(environment) <= known
    (watchdog,) = values(service, "WatchdogSec")
    assert watchdog.endswith("s") and float(watchdog[:-1]) > 0


def test_the_socket_unit_listens_on_the_default_port_for_the_service():
    socket_unit = unit("dache.socket")["Socket"]
    (listen,) = values(socket_unit, "ListenStream")
    host, _, port = listen.rpartition(":")
    assert int(port) == default_config().port
    assert host == "0.0.0.0"  # IPv4, as the service's domain=INET says
    service = unit("dache.service")["Unit"]
    assert "dache.socket" in " ".join(values(service, "After"))
    assert "dache.socket" in " ".join(values(service, "Wants"))


def test_systemd_analyze_verify_accepts_the_units(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (the only check that needs it)")
    # verify insists that ExecStart's program exists: point it at this venv's twistd.
    text = (DEPLOY / "dache.service").read_text().replace("/opt/dache/bin/twistd", TWISTD)
    (tmp_path / "dache.service").write_text(text)
    shutil.copy(DEPLOY / "dache.socket", tmp_path / "dache.socket")
    result = subprocess.run(
        [analyze, "verify", "--man=no", "dache.service", "dache.socket"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if "dache." in line]
    assert result.returncode == 0 and complaints == [], result.stdout + result.stderr


def test_a_worker_does_not_look_for_the_socket_systemd_gave_its_supervisor(monkeypatch):
    # With WORKERS > 1 only the supervisor adopts the systemd socket (and
    # Twisted then drops LISTEN_FDS from the environment); a worker accepts on
    # the supervisor's copy, so it must not fail start-up over the missing one.
    from dache import tap

    monkeypatch.setenv("DACHE_WORKER", "1")
    monkeypatch.setenv("LISTEN", "systemd:domain=INET:index=0")
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    assert isinstance(tap.makeService({}), DacheService)
