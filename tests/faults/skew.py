"""
Clock skew for one node: libfaketime (Debian's libfaketime package, installed
when missing, as root the way scripts/ensure-postgres.sh installs
PostgreSQL) preloaded into its process shifts the wall clock it reads, while
its monotonic clock (timeouts, intervals) stays true.
"""

from __future__ import annotations

import glob
import os
import subprocess

PATTERN = "/usr/lib/*/faketime/libfaketimeMT.so.1"


def library() -> str:
    found = glob.glob(PATTERN)
    if not found:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "libfaketime"],
            env=env,
            capture_output=True,
            check=True,
            timeout=600,
        )
        found = glob.glob(PATTERN)
    if not found:
        raise RuntimeError(f"libfaketime is not installed ({PATTERN}) and could not be")
    return found[0]


def skewed(env: dict[str, str], seconds: float) -> dict[str, str]:
    """`env` for a process whose wall clock runs `seconds` ahead (behind if negative)."""
    return {
        **env,
        "LD_PRELOAD": library(),
        "FAKETIME": f"{seconds:+g}",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "FAKETIME_NO_CACHE": "1",
    }
