"""
The container image (Dockerfile, .dockerignore) without a Docker engine: the
Dockerfile is parsed and held to the code's defaults, and its CMD and
HEALTHCHECK are run here as the image would run them (PATH leading to this
venv where the image has /opt/dache/bin, the volume a temp dir).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytest_twisted

from dache import healthcheck
from dache.config import SETTINGS, default_config
from dache.testing import MemoryNode
from tests.process import TWISTD

ROOT = Path(__file__).resolve().parent.parent
IMAGE_BIN = "/opt/dache/bin"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuations joined, comments dropped."""
    result, pending = [], ""
    for line in text.splitlines():
        if line.strip().startswith("#"):
            continue  # Docker drops comment lines, even inside a continuation
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def stages(text: str) -> list[list[tuple[str, str]]]:
    """The build stages: each FROM starts one."""
    found: list[list[tuple[str, str]]] = []
    for instruction in instructions(text):
        if instruction[0] == "FROM":
            found.append([])
        if found:
            found[-1].append(instruction)
    return found


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    """ENV KEY=value ... lines (quotes removed, as Docker does)."""
    env: dict[str, str] = {}
    for word, args in stage:
        if word == "ENV":
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def only(stage: list[tuple[str, str]], word: str) -> str:
    (args,) = [a for w, a in stage if w == word]
    return args


DOCKERFILE = (ROOT / "Dockerfile").read_text()
FINAL = stages(DOCKERFILE)[-1]


def test_the_image_is_built_in_two_stages_on_a_slim_base():
    build, final = stages(DOCKERFILE)
    args = dict(a.split("=", 1) for w, a in instructions(DOCKERFILE) if w == "ARG" and "=" in a)
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], only(final, "FROM"))
    assert base.startswith("python:3.") and "-slim" in base
    assert only(build, "FROM").endswith(" AS build")
    # The final stage takes the built venv, and runs no installer or compiler.
    assert any(w == "COPY" and a.startswith("--from=build /opt/dache ") for w, a in final)
    final_runs = " ".join(a for w, a in final if w == "RUN")
    for tool in ("pip", "apt-get", "gcc", "build-essential"):
        assert tool not in final_runs


def test_the_image_runs_as_a_non_root_user_it_creates():
    user = only(FINAL, "USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0  # numeric: runAsNonRoot can check it
    runs = " ".join(a for w, a in FINAL if w == "RUN")
    assert f"--uid {uid}" in runs and f"--gid {gid}" in runs


def test_the_volume_holds_the_disk_engines_data():
    (volume,) = shlex.split(only(FINAL, "VOLUME"))
    assert volume == "/var/lib/dache"
    assert env_of(FINAL)["DISK_PATH"] == volume
    runs = " ".join(a for w, a in FINAL if w == "RUN")
    assert f"chown dache:dache {volume}" in runs  # a fresh volume is writable by the user


def test_the_exposed_port_is_the_default_port():
    assert only(FINAL, "EXPOSE") == str(default_config().port)


def test_the_command_is_twistd_in_the_foreground_in_exec_form():
    # Exec form: twistd is PID 1 and receives docker stop's SIGTERM itself.
    assert json.loads(only(FINAL, "CMD")) == ["twistd", "-n", "--pidfile=", "dache"]
    assert only(FINAL, "STOPSIGNAL") == "SIGTERM"


def test_configuration_is_the_environment_with_the_codes_defaults():
    env = env_of(FINAL)
    settings = {s.env for s in SETTINGS}
    runtime = {"PATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE"}
    assert set(env) <= settings | runtime
    # PORT, DURABILITY_ENGINE, ... are left to the code, so `ENV PORT=...` in a
    # derived image (or -e) is the only thing that changes them.
    assert not ({"PORT", "DURABILITY_ENGINE", "LISTEN"} & set(env))
    assert env["PATH"].startswith(IMAGE_BIN + ":")


@pytest_twisted.ensureDeferred
async def test_the_healthcheck_probes_a_route_the_node_has():
    assert json.loads(only(FINAL, "HEALTHCHECK").partition("CMD ")[2]) == [
        "python",
        "-m",
        "dache.healthcheck",
    ]
    response = await MemoryNode().http.get("http://dache.test" + healthcheck.PATH)
    assert response.code == 200


def test_the_build_context_has_what_the_dockerfile_copies_and_no_local_state():
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    rules = [line.strip() for line in ignore if line.strip() and not line.startswith("#")]
    assert rules[0] == "*"  # everything out, then back in only what is copied
    kept = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    for word, args in instructions(DOCKERFILE):
        if word == "COPY" and not args.startswith("--from"):
            *sources, _ = args.split()
            assert set(sources) <= kept, sources
    assert not any(name in kept for name in (".venv", ".git", "dache-data", "tests"))


# -- the image's command line, run here


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_command(argv: list[str]) -> list[str]:
    """An exec-form command with its program found on the image's PATH, here."""
    program = {"twistd": TWISTD, "python": sys.executable}[argv[0]]
    return [program, *argv[1:]]


def test_the_images_command_serves_and_its_healthcheck_follows_it(tmp_path):
    volume = tmp_path / "volume"
    volume.mkdir()
    env = {
        **os.environ,
        **env_of(FINAL),
        # What the image sets to its own paths, pointed at this machine's:
        "PATH": os.path.dirname(TWISTD) + ":" + os.environ["PATH"],
        "DISK_PATH": str(volume),
        # The original dache's example lines, unchanged but for a free port:
        **env_of([("ENV", 'DURABILITY_ENGINE="memory"'), ("ENV", f"PORT={free_port()}")]),
    }
    assert env["DURABILITY_ENGINE"] == "memory"
    check = image_command(json.loads(only(FINAL, "HEALTHCHECK").partition("CMD ")[2]))

    def healthy() -> subprocess.CompletedProcess[str]:
        return subprocess.run(check, env=env, capture_output=True, text=True, timeout=30)

    node = subprocess.Popen(
        image_command(json.loads(only(FINAL, "CMD"))),
        env=env,
        cwd=volume,  # the image's WORKDIR
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while (probe := healthy()).returncode != 0:
            assert node.poll() is None, node.stdout.read()
            assert time.monotonic() < deadline, probe.stderr
            time.sleep(0.1)
        node.send_signal(signal.SIGTERM)  # docker stop
        assert node.wait(30) == 0
        output = node.stdout.read()
        assert f"listening on tcp:0.0.0.0:{env['PORT']}" in output
        assert "dache stopped" in output
    finally:
        node.kill()
        node.wait()
    probe = healthy()
    assert probe.returncode == 1
    assert probe.stderr.startswith("dache: unhealthy: ")


# -- the healthcheck reads the endpoint the node serves on


@pytest.mark.parametrize(
    "listen, kind, host, port",
    [
        ("tcp:8080", "http", "127.0.0.1", 8080),
        ("9090", "http", "127.0.0.1", 9090),
        ("tcp:port=8081:interface=10.1.2.3", "http", "10.1.2.3", 8081),
        ("tcp:8082:interface=0.0.0.0", "http", "127.0.0.1", 8082),
        ("tcp6:8083", "http", "::1", 8083),
        ("tcp6:8084:interface=\\:\\:", "http", "::1", 8084),
        ("ssl:8443:privateKey=/k\\:ey.pem:certKey=/c.pem", "https", "127.0.0.1", 8443),
    ],
)
def test_the_healthcheck_probes_where_the_node_listens(listen, kind, host, port):
    connection = healthcheck.connection(listen)
    assert (type(connection).__name__, connection.host, connection.port) == (
        {"http": "HTTPConnection", "https": "HTTPSConnection"}[kind],
        host,
        port,
    )


def test_the_healthcheck_refuses_an_endpoint_it_cannot_reach():
    problem = healthcheck.probe({"LISTEN": "systemd:domain=INET:index=0"})
    assert "cannot probe a 'systemd' endpoint" in problem


def test_the_healthcheck_reaches_a_node_on_a_unix_socket(dache_process, tmp_path):
    path = tmp_path / "dache.sock"
    node = dache_process(args=[f"--listen=unix:{path}"], wait=False)
    deadline = time.monotonic() + 30
    while (problem := healthcheck.probe({"LISTEN": f"unix:{path}"})) is not None:
        assert node.proc.poll() is None, node.output()
        assert time.monotonic() < deadline, problem
        time.sleep(0.1)
