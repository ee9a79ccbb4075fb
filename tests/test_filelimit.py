"""
The open-file limit (dache/filelimit.py): a node raises its soft RLIMIT_NOFILE
to what MAX_CONNECTIONS + WATCH_MAX need, and says so when the hard limit is
too low; the unit file gives it that much.
"""

from __future__ import annotations

import resource
from pathlib import Path

from dache.config import default_config
from dache.filelimit import needed
from tests.process import DacheProcess

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def soft_open_files(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open-file limit in /proc")


def start(env: dict[str, str], soft: int, hard: int) -> DacheProcess:
    node = DacheProcess({"DURABILITY_ENGINE": "memory", **env})
    return node.start(preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)))


def test_a_node_raises_its_soft_limit_to_what_its_settings_need():
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    node = start({"MAX_CONNECTIONS": "300", "WATCH_MAX": "700"}, 256, hard)
    try:
        assert soft_open_files(node.proc.pid) == min(300 + 700 + 128, hard)
        assert "open-file limit" not in node.output()
    finally:
        node.stop()


def test_a_hard_limit_below_the_settings_is_one_warning_naming_them():
    node = start({}, 256, 512)
    try:
        assert soft_open_files(node.proc.pid) == 512
        status, _, _ = node.request("GET", "/health/live")
        assert status == 200  # it serves, within what it has
        warning = [line for line in node.lines if "open-file limit" in line]
        assert len(warning) == 1
        assert "MAX_CONNECTIONS=1000" in warning[0] and "WATCH_MAX=10000" in warning[0]
    finally:
        node.stop()


def test_the_service_unit_allows_the_default_settings():
    config = default_config()
    lines = (DEPLOY / "dache.service").read_text().splitlines()
    limit = [line.split("=", 1)[1] for line in lines if line.startswith("LimitNOFILE=")]
    assert limit and int(limit[0]) >= needed(config)
