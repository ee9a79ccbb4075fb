"""
The C allocator under a memory bound (MAX_MEMORY).

An entry's body is one long-lived bytes object, made while the request that
wrote it holds several short-lived copies of the same size (the received
data, the request's content, its text, the parsed value, the value's JSON
slice). Objects over 512 bytes come from glibc's malloc, not from Python's
own allocator, and glibc carves them all from one heap: the short-lived ones
freed around each long-lived body leave holes that later bodies do not fit,
so RSS grows well past what the entries hold (measured: 300 MB of 60 KiB
values into a 64 MiB node peaked at 1.34x limit + baseline; the same with
this policy at 1.18x). Blocks of MMAP_THRESHOLD bytes or more are given
their own mapping instead, returned to the system the moment they are
freed. (glibc only; elsewhere this does nothing. GLIBC_TUNABLES set by the
user wins: we leave it alone.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD = 32 * 1024


def bound_heap() -> bool:
    """Ask glibc to map large blocks on their own; True if it took the setting."""
    if "GLIBC_TUNABLES" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
