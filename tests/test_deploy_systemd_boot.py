"""
deploy/dache.service and deploy/dache.socket, unchanged, under a real systemd: a container
booted with /sbin/init (tests/podman.py), dache's venv in /opt/dache as the README's
systemd steps install it. One booted container serves the whole module, the checks in
order. It has no network but its own loopback (the socket unit listens on its own port
8080), so requests are made inside it with the small client below; the suite's
PostgreSQL reaches it as its unix socket, mounted in.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import podman
from tests.podman import Container, wait_until

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
STATE = "/var/lib/private/dache"  # where StateDirectory= puts it for a DynamicUser
BULK = 1_000_000  # entries in the log that holds the load long enough to see

# Run inside the container by its Debian Python: an HTTP client for the socket unit's port.
CLIENT = r"""
import json, subprocess, sys, urllib.error, urllib.request

BASE = "http://127.0.0.1:8080"


def call(method, key, value=None):
    data = None if value is None else json.dumps({"value": value}).encode()
    request = urllib.request.Request(f"{BASE}/dache/{key}", data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


command = sys.argv[1]
if command == "write":  # write PREFIX COUNT [KILL_AT]: the keys acknowledged
    prefix, count = sys.argv[2], int(sys.argv[3])
    kill_at = int(sys.argv[4]) if len(sys.argv) > 4 else None
    acked, errors = [], 0
    for n in range(count):
        if n == kill_at:
            subprocess.run(["systemctl", "kill", "-s", "KILL", "dache.service"], check=True)
        try:
            if call("PUT", f"{prefix}-{n}", n)[0] == 204:
                acked.append(f"{prefix}-{n}")
        except OSError:
            errors += 1  # the connection the kill cut: never acknowledged
    print(json.dumps({"acked": acked, "errors": errors}))
elif command == "missing":  # missing KEY...: those not answered 200
    print(json.dumps([key for key in sys.argv[2:] if call("GET", key)[0] != 200]))
elif command == "get":
    status, body = call("GET", sys.argv[2])
    print(json.dumps([status, json.loads(body) if body else None]))
"""

# Writes a disk log of BULK entries (the format of dache/engines/disklog.py) in no time.
BULK_LOG = r"""
import sys
from dache.engines.disklog import encode_header, encode_set, frame

path, count = sys.argv[1], int(sys.argv[2])
with open(path, "wb") as log:
    log.write(encode_header(0))
    for start in range(1, count + 1, 1000):
        batch = range(start, min(start + 1000, count + 1))
        log.write(frame(b"".join(encode_set(b"bulk-%d" % n, b"%d" % n, None, n) for n in batch)))
"""

# The PIDs in dache.service's cgroup (read from /proc, whatever the cgroup layout).
CGROUP_PIDS = r"""
import json, os, subprocess

group = subprocess.run(
    ["systemctl", "show", "-p", "ControlGroup", "--value", "dache.service"],
    capture_output=True, text=True, check=True,
).stdout.strip()
found = {}
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        lines = open(f"/proc/{pid}/cgroup").read().splitlines()
        command = open(f"/proc/{pid}/cmdline").read().replace("\0", " ")
    except OSError:
        continue
    if group and any(line.split(":", 2)[2] == group for line in lines):
        found[pid] = command
print(json.dumps(found))
"""


class Systemd:
    """The booted container, and what the checks ask of it."""

    def __init__(self, container: Container):
        self.container = container

    def sh(self, script: str, check: bool = True, timeout: float = 120.0) -> str:
        result = self.container.exec("sh", "-c", script, check=check, timeout=timeout)
        return result.stdout.strip()

    def python(self, program: str, *args: str) -> object:
        return json.loads(self.sh(f"python3 /root/{program}.py {' '.join(args)}"))

    def show(self, *properties: str) -> dict[str, str]:
        flags = " ".join(f"-p {name}" for name in properties)
        lines = self.sh(f"systemctl show dache.service {flags}").splitlines()
        return dict(line.split("=", 1) for line in lines)

    def journal(self) -> str:
        return self.sh("journalctl --no-pager -o cat -u dache.service -u dache.socket")

    def wait_active(self, timeout: float = 60.0) -> None:
        wait_until(
            lambda: self.sh("systemctl is-active dache.service", check=False) == "active",
            "dache.service to be active",
            timeout=timeout,
        )

    def restarted(self, restarts: int, timeout: float) -> dict[str, str]:
        """Wait for the unit's NRestarts to reach `restarts` and the unit to be active."""

        def done() -> dict[str, str] | None:
            state = self.show("NRestarts", "ActiveState", "MainPID")
            ok = int(state["NRestarts"]) >= restarts and state["ActiveState"] == "active"
            return state if ok else None

        return wait_until(done, f"restart number {restarts} of dache.service", timeout=timeout)


@pytest.fixture(scope="module")
def database(postgres) -> Iterator[object]:
    database = postgres.create_database()
    yield database
    postgres.drop_database(database)


@pytest.fixture(scope="module")
def systemd(database) -> Iterator[Systemd]:
    image = podman.systemd_image()
    server = database.server
    options = ["--privileged", "--systemd=always", "--network=none"]
    if server.host.startswith("/"):
        # Only the socket: its directory may be entered by its owner alone.
        name = f".s.PGSQL.{server.port}"
        options.append(f"--volume={server.host}/{name}:/run/postgresql/{name}")
    with podman.containers() as run:
        booted = Systemd(run(image, "/sbin/init", options=options))
        wait_until(
            lambda: (
                booted.sh("systemctl is-system-running", check=False) in ("running", "degraded")
            ),
            "systemd to boot",
            timeout=120,
        )
        for name in ("dache.service", "dache.socket"):
            podman.podman("cp", str(DEPLOY / name), f"{booted.container.name}:/etc/systemd/system/")
        for program, text in (("client", CLIENT), ("bulk_log", BULK_LOG), ("cgroup", CGROUP_PIDS)):
            booted.sh(f"cat > /root/{program}.py <<'EOF'\n{text}\nEOF")
        # Debug level makes systemd log each sd_notify message (STOPPING=1 among them).
        booted.sh("systemctl daemon-reload && systemd-analyze log-level debug")
        yield booted


def test_systemd_analyze_security_rates_the_unit_ok(systemd):
    text = systemd.sh("systemd-analyze security --no-pager dache.service")
    (score,) = re.findall(r"Overall exposure level for dache\.service: ([\d.]+) (\w+)", text)
    remaining = [
        line.split()[1] for line in text.splitlines() if line.startswith("✗")
    ]  # what still counts: listed in the report
    podman.report(f"systemd: exposure {score[0]} {score[1]}; remaining: {', '.join(remaining)}")
    assert float(score[0]) <= 2.0


def test_the_first_request_on_the_socket_starts_the_service(systemd):
    systemd.sh("systemctl start dache.socket")
    assert systemd.sh("systemctl is-active dache.socket") == "active"
    assert systemd.sh("systemctl is-active dache.service", check=False) == "inactive"
    assert systemd.python("client", "write", "first", "1") == {"acked": ["first-0"], "errors": 0}
    assert systemd.sh("systemctl is-active dache.service") == "active"
    assert systemd.python("client", "get", "first-0") == [200, {"key": "first-0", "value": 0}]


def test_a_dynamic_user_writes_its_log_only_in_the_state_directory(systemd):
    pid = systemd.show("MainPID")["MainPID"]
    uid = systemd.sh(f"stat -c %u /proc/{pid}")
    assert uid != "0"
    assert systemd.sh("readlink /var/lib/dache") == "private/dache"
    assert systemd.sh(f"stat -c %u {STATE}/dache.log") == uid
    assert "/var/lib/dache/dache.log" in systemd.journal()
    # ProtectSystem=strict: the root it sees is mounted read-only.
    root = systemd.sh(f"awk '$5 == \"/\" {{print $6}}' /proc/{pid}/mountinfo")
    assert "ro" in root.split(","), root


def test_the_unit_is_active_only_once_the_cache_is_loaded(systemd):
    """Type=notify: READY=1 after the load; `systemctl start` returns only then."""
    systemd.sh("systemctl stop dache.service")
    log = f"{STATE}/dache.log"
    systemd.sh(
        f"/opt/dache/bin/python /root/bulk_log.py {log} {BULK} && chown --reference={STATE} {log}"
    )
    pattern = rf"loaded {BULK} entries in ([\d.]+)s"
    assert re.findall(pattern, systemd.journal()) == []
    # One shell: the journal is read the moment `systemctl start` returns.
    after = systemd.sh("systemctl start dache.service && journalctl -o cat -u dache.service")
    (loaded,) = re.findall(pattern, after)
    times = systemd.show("ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic")
    activating = (
        int(times["ActiveEnterTimestampMonotonic"]) - int(times["ExecMainStartTimestampMonotonic"])
    ) / 1e6
    assert activating >= float(loaded)  # activating for the whole load, not active at exec
    podman.report(
        f"systemd: {BULK} entries loaded in {loaded} s; unit activating for {activating:.2f} s"
    )
    assert systemd.python("client", "get", f"bulk-{BULK}") == [
        200,
        {"key": f"bulk-{BULK}", "value": BULK},
    ]


def test_a_killed_service_is_restarted_with_every_acknowledged_write(systemd):
    before = int(systemd.show("NRestarts")["NRestarts"])
    result = systemd.python("client", "write", "kill", "400", "200")
    state = systemd.restarted(before + 1, timeout=60)
    assert len(result["acked"]) >= 399  # clients waited in the socket's backlog
    missing = systemd.python("client", "missing", *result["acked"], f"bulk-{BULK}")
    assert missing == []
    assert "status=9/KILL" in systemd.journal()
    podman.report(
        f"systemd: kill -9 -> restart {state['NRestarts']}, {len(result['acked'])} of 400 writes "
        f"acked around it ({result['errors']} cut), 0 lost"
    )


def test_a_wedged_service_is_restarted_by_the_watchdog(systemd):
    state = systemd.show("NRestarts", "MainPID", "WatchdogUSec")
    assert state["WatchdogUSec"] == "30s"
    systemd.sh("systemctl kill -s STOP --kill-whom=main dache.service")
    after = systemd.restarted(int(state["NRestarts"]) + 1, timeout=120)
    assert after["MainPID"] != state["MainPID"]
    assert "Watchdog timeout" in systemd.journal()
    assert systemd.python("client", "missing", f"bulk-{BULK}", "kill-0") == []
    podman.report("systemd: SIGSTOP of the main process -> watchdog timeout -> restarted")


def test_two_workers_live_in_the_units_cgroup_and_restart_with_it(systemd, database):
    settings = {
        "WORKERS": "2",
        "DURABILITY_ENGINE": "postgres",
        "POSTGRES_PORT": str(database.server.port),
        "POSTGRES_USER": database.server.user,
        "POSTGRES_DATABASE": database.name,
        "POSTGRES_HOST": "/run/postgresql"
        if database.server.host.startswith("/")
        else database.server.host,
    }
    if database.server.password:
        settings["POSTGRES_PASSWORD"] = database.server.password
    env = "\n".join(f"{key}={value}" for key, value in settings.items())
    systemd.sh(f"install -d -m 0755 /etc/dache && cat > /etc/dache/dache.env <<'EOF'\n{env}\nEOF")
    try:
        systemd.sh("systemctl restart dache.service")
        first = systemd.python("cgroup")
        assert len(first) == 2 and all("twistd" in command for command in first.values()), first
        assert systemd.python("client", "write", "pg", "20") == {
            "acked": [f"pg-{n}" for n in range(20)],
            "errors": 0,
        }
        assert set(database.rows()) >= {f"pg-{n}" for n in range(20)}
        systemd.sh("systemctl restart dache.service")
        second = systemd.python("cgroup")
        assert len(second) == 2 and not set(first) & set(second), (first, second)
        podman.report(
            f"systemd: WORKERS=2 -> pids {sorted(first)} then {sorted(second)} in the cgroup"
        )
    finally:
        systemd.sh("rm -f /etc/dache/dache.env")


def test_stop_is_a_clean_exit_announced_with_stopping(systemd):
    systemd.sh("systemctl restart dache.service")
    pid = systemd.show("MainPID")["MainPID"]
    systemd.sh("systemctl stop dache.service")
    state = systemd.show("Result", "ExecMainCode", "ExecMainStatus", "ActiveState")
    assert state == {
        "Result": "success",
        "ExecMainCode": "1",  # exited (not killed)
        "ExecMainStatus": "0",
        "ActiveState": "inactive",
    }
    assert f"Got notification message from PID {pid} (STOPPING=1" in systemd.journal()
    assert systemd.sh("systemctl is-active dache.socket") == "active"  # the port stays held
    podman.report("systemd: systemctl stop -> STOPPING=1, exit status 0, Result=success")
