"""
Clock skew for one node: libfaketime (Debian's libfaketime package, installed
when missing, as root the way scripts/ensure-postgres.sh installs
PostgreSQL) preloaded into its process shifts the wall clock it reads, while
its monotonic clock (timeouts, intervals) stays true.
"""

from __future__ import annotations

import glob

from tests import debian

PATTERN = "/usr/lib/*/faketime/libfaketimeMT.so.1"


def library() -> str:
    debian.ensure("libfaketime", lambda: bool(glob.glob(PATTERN)))
    return glob.glob(PATTERN)[0]


def skewed(env: dict[str, str], seconds: float) -> dict[str, str]:
    """`env` for a process whose wall clock runs `seconds` ahead (behind if negative)."""
    return {
        **env,
        "LD_PRELOAD": library(),
        "FAKETIME": f"{seconds:+g}",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "FAKETIME_NO_CACHE": "1",
    }
