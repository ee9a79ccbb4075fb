"""
podman for the deploy tests (tests/test_deploy_image.py, tests/test_deploy_systemd_boot.py).

podman, runc and mmdebstrap come from Debian's packages, installed when missing. No image
registry is reachable, so base images are made locally with mmdebstrap and `podman import`ed;
they and the dache image stay in podman's storage between runs, tagged by a hash of what they
are made of (the package list; the build context and the base), so a run rebuilds only what
changed. What this machine needs (see issue 14):
- crun refuses the hybrid cgroup layout: every container runs with `--runtime runc`;
- podman's default ulimits are refused: a containers.conf with `default_ulimits = []`,
  named by CONTAINERS_CONF;
- `--format docker` keeps the Dockerfile's HEALTHCHECK (the OCI format drops it);
- pip inside a build needs the machine's pip configuration and CA bundle, mounted read-only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tests import debian

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("DACHE_TEST_CACHE", "/var/cache/dache-tests"))
SUITE = "bookworm"
RUNTIME = ("--runtime", "runc")
# The build's and the containers' view of this machine's pip configuration and CA bundle.
HOST_MOUNTS = tuple(
    f"{path}:{path}:ro" for path in ("/etc/ssl/certs", "/etc/pip.conf") if os.path.exists(path)
)

# name -> Debian packages of a base image (minbase variant).
BASES = {
    "python": ("python3", "python3-venv", "python-is-python3"),
    "systemd": ("python3", "python3-venv", "python-is-python3", "systemd", "systemd-sysv", "dbus"),
}
# The files the Dockerfile's build sees (its .dockerignore lets in only these).
CONTEXT = ("Dockerfile", ".dockerignore", "pyproject.toml", "setup.py", "README.md")
CONTEXT_TREES = ("dache", "twisted")

T = TypeVar("T")


class PodmanError(RuntimeError):
    pass


def ensure_tools() -> None:
    for package, program in (("podman", "podman"), ("runc", "runc"), ("mmdebstrap", "mmdebstrap")):
        debian.ensure(package, lambda program=program: shutil.which(program) is not None)


def environment() -> dict[str, str]:
    """os.environ plus CONTAINERS_CONF naming the containers.conf this machine needs."""
    CACHE.mkdir(parents=True, exist_ok=True)
    conf = CACHE / "containers.conf"
    text = "[containers]\ndefault_ulimits = []\n"
    if not conf.exists() or conf.read_text() != text:
        conf.write_text(text)
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def podman(
    *args: str, timeout: float = 120.0, check: bool = True, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `podman args`; PodmanError with its output when it fails and check is set."""
    result = subprocess.run(
        ["podman", *args],
        env=environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
    )
    if check and result.returncode != 0:
        raise PodmanError(f"podman {args[0]} failed ({result.returncode}):\n{result.stderr}")
    return result


def image_exists(tag: str) -> bool:
    return podman("image", "exists", tag, check=False).returncode == 0


def _digest(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "big") + part)
    return digest.hexdigest()[:16]


def base_tag(name: str) -> str:
    return (
        f"localhost/dache-test-base-{name}:{_digest(SUITE.encode(), *map(str.encode, BASES[name]))}"
    )


def ensure_bases(timeout: float = 600.0) -> None:
    """Every base image in podman's storage; the missing ones made at once, side by side."""
    ensure_tools()
    missing = [name for name in BASES if not image_exists(base_tag(name))]
    if not missing:
        return
    workdir = Path(tempfile.mkdtemp(prefix="dache-base-", dir=CACHE))
    running: dict[str, Any] = {}
    try:
        for name in missing:
            command = [
                "mmdebstrap",
                "--quiet",
                "--variant=minbase",
                "--include=" + ",".join(BASES[name]),
                SUITE,
                str(workdir / f"{name}.tar"),
            ]
            log = open(workdir / f"{name}.log", "w")  # noqa: SIM115 - closed below
            running[name] = (subprocess.Popen(command, stdout=log, stderr=log), log)
        deadline = time.monotonic() + timeout
        for name, (process, log) in running.items():
            try:
                code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                code = process.wait()
            log.close()
            if code != 0:
                output = (workdir / f"{name}.log").read_text()[-3000:]
                raise PodmanError(f"mmdebstrap of the {name} base failed ({code}):\n{output}")
            podman("import", str(workdir / f"{name}.tar"), base_tag(name), timeout=300)
    finally:
        for process, log in running.values():
            if process.poll() is None:
                process.kill()
                process.wait()
            log.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _context_files() -> list[Path]:
    files = [ROOT / name for name in CONTEXT]
    for tree in CONTEXT_TREES:
        for path in sorted((ROOT / tree).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                if path.name != "dropin.cache":
                    files.append(path)
    return files


def dache_tag() -> str:
    """The tag of the image the Dockerfile builds from this checkout on the python base."""
    parts = [base_tag("python").encode()]
    for path in _context_files():
        parts += [str(path.relative_to(ROOT)).encode(), path.read_bytes()]
    return f"localhost/dache-test:{_digest(*parts)}"


def _forget_other_tags(repository: str, keep: str) -> None:
    """Remove older builds of `repository` so the cache does not grow with every change."""
    listed = podman("images", "--format", "{{.Repository}}:{{.Tag}}", repository, check=False)
    for tag in listed.stdout.split():
        if tag != keep and tag.startswith(repository + ":"):
            podman("rmi", "--force", tag, check=False)
    podman("image", "prune", "--force", check=False)


def build(tag: str, containerfile: Path, context: Path, build_args: dict[str, str]) -> None:
    args = ["build", *RUNTIME, "--network=host", "--format", "docker", "--tag", tag]
    args += ["--file", str(containerfile)]
    for key, value in build_args.items():
        args += ["--build-arg", f"{key}={value}"]
    for mount in HOST_MOUNTS:
        args += ["--volume", mount]
    podman(*args, str(context), timeout=600)


def dache_image() -> str:
    """The project's Dockerfile built with podman (cached by dache_tag)."""
    ensure_bases()
    tag = dache_tag()
    if not image_exists(tag):
        build(tag, ROOT / "Dockerfile", ROOT, {"PYTHON_IMAGE": base_tag("python")})
        _forget_other_tags("localhost/dache-test", tag)
    return tag


def systemd_image() -> str:
    """
    The systemd base with dache's venv in /opt/dache, where the README's systemd steps and
    deploy/dache.service put it: the venv the Dockerfile built from this checkout, on the same
    Debian Python. The unit files are copied in by the tests, so they are always the checkout's.
    """
    dache = dache_image()
    tag = f"localhost/dache-test-systemd:{_digest(base_tag('systemd').encode(), dache.encode())}"
    if not image_exists(tag):
        with tempfile.TemporaryDirectory(prefix="dache-systemd-") as context:
            containerfile = Path(context) / "Containerfile"
            containerfile.write_text(
                f"FROM {dache} AS dache\n"
                f"FROM {base_tag('systemd')}\n"
                "COPY --from=dache /opt/dache /opt/dache\n"
                'CMD ["/sbin/init"]\n'
            )
            build(tag, containerfile, Path(context), {})
        _forget_other_tags("localhost/dache-test-systemd", tag)
    return tag


def wait_until(
    probe: Callable[[], T | None], what: str, timeout: float = 30.0, interval: float = 0.2
) -> T:
    """probe()'s first truthy answer, polled until `timeout`; AssertionError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        answer = probe()
        if answer:
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class Container:
    """One container, known by its name; `remove` is safe to call more than once."""

    def __init__(self, name: str):
        self.name = name

    def inspect(self, template: str) -> str:
        return podman("inspect", "--format", template, self.name).stdout.strip()

    def state(self) -> dict[str, Any]:
        return json.loads(self.inspect("{{json .State}}"))

    def exec(
        self, *command: str, check: bool = True, timeout: float = 60.0, user: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        args = ["exec", *(("--user", user) if user else ()), self.name, *command]
        return podman(*args, check=check, timeout=timeout)

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return result.stdout + result.stderr

    def stop(self, timeout: int = 10) -> None:
        podman("stop", "--time", str(timeout), self.name, timeout=timeout + 60)

    def remove(self) -> None:
        # --volumes: also the anonymous volume the image's VOLUME gives a container.
        podman("rm", "--force", "--volumes", "--time", "0", self.name, check=False, timeout=60)


@contextlib.contextmanager
def containers() -> Iterator[Callable[..., Container]]:
    """
    run(image, *command, options=[...]) -> a started Container (podman run -d, runc, and
    --network=host unless options name a network); every one removed on the way out.
    """
    started: list[Container] = []

    def run(image: str, *command: str, options: Sequence[str] = ()) -> Container:
        container = Container(f"dache-test-{uuid.uuid4().hex[:12]}")
        started.append(container)
        network = () if any(o.startswith("--network") for o in options) else ("--network=host",)
        podman(
            "run",
            "--detach",
            "--name",
            container.name,
            *RUNTIME,
            *network,
            *options,
            image,
            *command,
        )
        return container

    try:
        yield run
    finally:
        for container in started:
            container.remove()


@contextlib.contextmanager
def volume() -> Iterator[str]:
    """A named volume, removed on the way out."""
    name = f"dache-test-{uuid.uuid4().hex[:12]}"
    podman("volume", "create", name)
    try:
        yield name
    finally:
        podman("volume", "rm", "--force", name, check=False)


@contextlib.contextmanager
def secret(data: str) -> Iterator[str]:
    """A podman secret holding `data` (given on stdin, never on a command line)."""
    name = f"dache-test-{uuid.uuid4().hex[:12]}"
    podman("secret", "create", name, "-", input=data)
    try:
        yield name
    finally:
        podman("secret", "rm", name, check=False)


# Observations the deploy tests make (image size, exposure score, ...), printed at the
# end of the run by tests/conftest.py so a reader sees them without -s.
REPORT: list[str] = []


def report(line: str) -> None:
    REPORT.append(line)
