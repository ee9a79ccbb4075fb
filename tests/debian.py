"""Debian packages a test needs, installed when missing (as root, as CI runs)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable


def ensure(package: str, present: Callable[[], bool]) -> None:
    """apt-get install `package` unless present(); RuntimeError if it is still missing."""
    if present():
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    wait = ["-o", "DPkg::Lock::Timeout=300"]  # another apt-get on the machine: wait, not fail
    subprocess.run(["apt-get", *wait, "update", "-q"], env=env, capture_output=True, timeout=600)
    install = ["apt-get", *wait, "install", "-y", "-q", package]
    subprocess.run(install, env=env, capture_output=True, timeout=600)
    if not present():
        raise RuntimeError(f"the Debian package {package} is missing and could not be installed")
