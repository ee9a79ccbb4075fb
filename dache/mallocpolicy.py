"""
The C allocator under a memory bound (MAX_MEMORY).

An entry's body is one long-lived bytes object, made while the request that
wrote it holds several short-lived copies of the same size (the received
data, the request's content, its text, the parsed value, the value's JSON
slice). Objects over 512 bytes come from glibc's malloc, not from Python's
own allocator, and glibc carves them all from one heap: the short-lived ones
freed around each long-lived body leave holes that later bodies do not fit,
so RSS grows well past what the entries hold. Two settings fix it:

- blocks of MMAP_THRESHOLD bytes or more get their own mapping, returned to
  the system the moment they are freed (Twisted's 64 KiB receive buffers
  among them); dache.store.cache counts such bodies in whole pages;
- no top pad (M_TOP_PAD 0, glibc's default is 128 KiB): the heap grows by
  what is asked for only.

Measured on real twistd processes (tests/test_eviction_process.py, RSS from
/proc against `memory:used`): with the threshold alone, 1 KiB and 4 KiB values
grew RSS by 1.32x and 1.38x the counted bytes; with both, 1.04-1.06x and
1.01x (100 B: 1.06x, 32 KiB: 1.00x); 300 MB of mixed 1-60 KiB values into a
64 MiB node peaked at 1.04x (limit + empty process). (glibc only; elsewhere
this does nothing. GLIBC_TUNABLES set by the user wins: we leave it alone.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TOP_PAD = -2  # glibc's mallopt parameter numbers
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024  # dache.store.cache.MAPPED_BODY counts such bodies in whole pages
TOP_PAD = 0


def bound_heap() -> bool:
    """Ask glibc to map large blocks on their own, pad no heap growth; True if it took both."""
    if "GLIBC_TUNABLES" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) & bool(mallopt(M_TOP_PAD, TOP_PAD))
