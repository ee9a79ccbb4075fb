"""
The project's Dockerfile built and run for real, with podman (tests/podman.py has the
recipe this machine needs). One image build is shared by the module; the node container
starts first so that its HEALTHCHECK's start period is over by the last test.
"""

from __future__ import annotations

import http.client
import json
import secrets
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import podman
from tests.podman import Container, wait_until

UID = 10001
VOLUME = "/var/lib/dache"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def request(
    port: int, method: str, path: str, body: object = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        data = None if body is None else json.dumps(body).encode()
        connection.request(method, path, body=data, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def answers(port: int) -> bool:
    try:
        return request(port, "GET", "/health/live")[0] == 200
    except OSError:
        return False


class Node:
    """A dache container listening on 127.0.0.1:port of this machine (--network=host)."""

    def __init__(self, container: Container, port: int):
        self.container = container
        self.port = port

    def set(self, key: str, value: object, headers: dict[str, str] | None = None) -> int:
        return request(self.port, "PUT", f"/dache/{key}", {"value": value}, headers)[0]

    def get(self, key: str, headers: dict[str, str] | None = None) -> tuple[int, object]:
        status, body = request(self.port, "GET", f"/dache/{key}", headers=headers)
        return status, json.loads(body).get("value") if status == 200 else None


@pytest.fixture(scope="module")
def image() -> str:
    return podman.dache_image()


@pytest.fixture(scope="module")
def run(image):
    """start(env, options) -> a Node of the image, answering; all removed after the module."""
    with podman.containers() as run_container:

        def start(env: dict[str, str] | None = None, options: tuple[str, ...] = ()) -> Node:
            port = free_port()
            env = {"LISTEN": f"tcp:{port}:interface=127.0.0.1", **(env or {})}
            flags = [f"--env={key}={value}" for key, value in env.items()]
            node = Node(run_container(image, options=[*flags, *options]), port)
            wait_until(
                lambda: answers(port) or node.container.state()["Status"] != "running",
                "the container to answer",
            )
            assert answers(port), node.container.logs()
            return node

        yield start


@pytest.fixture(scope="module")
def node(run) -> Node:
    return run()


@pytest.fixture
def data_volume() -> Iterator[str]:
    with podman.volume() as name:
        yield name


def test_the_node_runs_as_uid_10001_not_root(node):
    pid = node.container.inspect("{{.State.Pid}}")
    status = Path(f"/proc/{pid}/status").read_text()
    (uids,) = [line.split()[1:] for line in status.splitlines() if line.startswith("Uid:")]
    assert uids == [str(UID)] * 4  # real, effective, saved, file system
    assert "twistd" in Path(f"/proc/{pid}/cmdline").read_text()


def test_a_write_survives_stop_rm_and_a_new_container_on_the_same_volume(run, data_volume):
    first = run(options=(f"--volume={data_volume}:{VOLUME}",))
    assert first.set("kept", {"n": 1}) == 204
    first.container.stop()
    first.container.remove()
    second = run(options=(f"--volume={data_volume}:{VOLUME}",))
    assert second.get("kept") == (200, {"n": 1})
    owner = second.container.exec("stat", "-c", "%u", f"{VOLUME}/dache.log").stdout.strip()
    assert owner == str(UID)


def test_podman_stop_acknowledges_in_flight_writes_and_exits_0_within_10s(run, data_volume):
    node = run(options=(f"--volume={data_volume}:{VOLUME}",))
    acked: list[str] = []
    refused: list[int] = []
    enough = threading.Event()

    def writer(prefix: str) -> None:
        for n in range(100_000):
            key = f"{prefix}-{n}"
            try:
                status = node.set(key, n)
            except OSError:
                return  # the node is gone: this write was never acknowledged
            if status == 204:
                acked.append(key)
            else:
                refused.append(status)
            if len(acked) >= 200:
                enough.set()

    threads = [threading.Thread(target=writer, args=(f"w{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    assert enough.wait(60), node.container.logs()
    still_writing = sum(thread.is_alive() for thread in threads)
    # SIGTERM, then SIGKILL after 10 s: exit code 0 means it finished within them.
    node.container.stop(timeout=10)
    for thread in threads:
        thread.join(30)
    state = node.container.state()
    assert (state["ExitCode"], state["OOMKilled"]) == (0, False), node.container.logs()
    assert still_writing == len(threads)  # the stop landed among writes in flight
    assert "Server Shut Down" in node.container.logs()
    node.container.remove()

    after = run(options=(f"--volume={data_volume}:{VOLUME}",))
    lost = [key for key in acked if after.get(key)[0] != 200]
    assert lost == []
    assert set(refused) <= {503}  # a write refused while shutting down says so
    podman.report(f"image: podman stop during 8 writers: exit 0, {len(acked)} writes acked, 0 lost")


def test_auth_token_file_from_a_podman_secret_guards_writes_and_stays_out_of_logs(run):
    token = secrets.token_urlsafe(32)
    with podman.secret(token) as name:
        node = run(
            {"AUTH_TOKEN_FILE": f"/run/secrets/{name}", "ACCESS_LOG": "true"},
            (f"--secret={name},uid={UID},gid={UID},mode=0400",),
        )
        bearer = {"Authorization": f"Bearer {token}"}
        assert node.set("guarded", 1) == 401
        assert node.set("guarded", 1, {"Authorization": "Bearer wrong"}) == 401
        assert node.set("guarded", 2, bearer) == 204
        assert node.get("guarded", bearer) == (200, 2)
        logs = node.container.logs()
        assert "PUT /dache/guarded" in logs  # the access log is on, and holds no token
        assert token not in logs
        assert token not in podman.podman("inspect", node.container.name).stdout


def test_the_postgres_engine_works_from_the_container(run, pg, monkeypatch):
    server = pg.server
    options: list[str] = []
    env = {"DURABILITY_ENGINE": "postgres", "POSTGRES_DATABASE": pg.name}
    env |= {"POSTGRES_USER": server.user, "POSTGRES_PORT": str(server.port)}
    if server.host.startswith("/"):
        # The suite's own cluster listens on a unix socket in a directory only its owner
        # may enter: mount the socket alone (PostgreSQL's sockets are 0777).
        socket_name = f".s.PGSQL.{server.port}"
        options.append(f"--volume={server.host}/{socket_name}:/run/postgresql/{socket_name}")
        env["POSTGRES_HOST"] = "/run/postgresql"
    else:
        env["POSTGRES_HOST"] = server.host
    if server.password:
        monkeypatch.setenv("POSTGRES_PASSWORD", server.password)
        options.append("--env=POSTGRES_PASSWORD")  # taken from the environment, not argv
    node = run(env, tuple(options))
    key = f"pg-{uuid.uuid4().hex[:8]}"
    assert node.set(key, {"from": "container"}) == 204
    stored = pg.rows()[key][0]
    assert (json.loads(stored) if isinstance(stored, str) else stored) == {"from": "container"}
    assert node.get(key) == (200, {"from": "container"})


def test_the_final_stage_is_lean_and_its_size_is_reported(image):
    size = int(podman.podman("image", "inspect", "--format", "{{.Size}}", image).stdout)
    probe = (
        "for p in gcc cc make pip pip3; do command -v $p; done;"
        " ls -d /src /opt/dache/bin/pip* /opt/dache/lib/python3*/site-packages/tests 2>/dev/null;"
        " python -m pip --version 2>/dev/null; true"
    )
    result = podman.podman(
        "run", "--rm", *podman.RUNTIME, "--network=none", image, "sh", "-c", probe
    )
    assert result.stdout.strip() == ""  # no compiler, no pip, no sources or tests
    podman.report(f"image: {image} is {size / 1e6:.0f} MB ({size} bytes)")
    assert size < 400e6


def test_the_healthcheck_is_healthy_and_unhealthy_when_the_node_is_sigstopped(node):
    container = node.container
    probe = podman.podman("healthcheck", "run", container.name, check=False)
    assert probe.returncode == 0, probe.stdout + probe.stderr
    assert container.state()["Health"]["Status"] == "healthy"
    config = json.loads(container.inspect("{{json .Config.Healthcheck}}"))
    podman.podman("kill", "--signal", "STOP", container.name)
    try:
        # Failures inside the start period do not count; past it, `retries` failing
        # probes in a row make it unhealthy. Podman runs a probe when asked (its
        # timers need systemd on this machine), so the test asks.
        def unhealthy() -> bool:
            podman.podman("healthcheck", "run", container.name, check=False)
            return container.state()["Health"]["Status"] == "unhealthy"

        budget = (config["StartPeriod"] + config["Retries"] * config["Timeout"]) / 1e9 + 60
        wait_until(unhealthy, "the stopped node to turn unhealthy", timeout=budget)
    finally:
        podman.podman("kill", "--signal", "CONT", container.name)
    wait_until(
        lambda: podman.podman("healthcheck", "run", container.name, check=False).returncode == 0,
        "the resumed node to pass its healthcheck",
    )
    assert container.state()["Health"]["Status"] == "healthy"
    podman.report("image: HEALTHCHECK healthy; unhealthy while SIGSTOPped; healthy after SIGCONT")
