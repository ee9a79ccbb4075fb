"""
Compaction of the disk engine's log, on a thread of its own (plain blocking
Python, as disklog.py). The engine hands over a snapshot of the live entries
taken on the reactor at a moment when the cache holds exactly the log up to
offset `start`; this writes them to a new log beside the old one and then
copies, in rounds, what the writer keeps appending to the old log after
`start`, so that only a small remainder is left for the writer to copy at the
switch (LogWriter.switch), when appends pause.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from dache.engines.disklog import (
    copy_range,
    encode_block,
    encode_header,
    frame,
    remove_if_present,
    sync_file,
    write_all,
)
from dache.entry import EXPIRY_AT, EXPIRY_OFFSET, revision_of

RECORD_BYTES = 1 << 20  # the snapshot is written as records of about this size
CATCH_UP_ROUNDS = 16
CATCH_UP_LEFT = 256 << 10  # stop catching up once at most this much is left to copy


class Aborted(Exception):
    """The engine is closing; the compaction stops and its file is removed."""


def compact(
    path: str,
    log_path: str,
    keys: Iterable[str],
    entries: Mapping[str, Any],
    now: float,
    base_revision: int,
    start: int,
    log_end: Callable[[], int],
    abort: threading.Event,
) -> tuple[int, int]:
    """
    Write a compacted log to `path`: a header with `base_revision`, the
    entries (key -> cache Entry) that are live at `now`, in the order of
    `keys` (every key of `entries`: sorted, the load's key index is built
    from sorted keys, in a tenth of the time), then the old log's records from `start`
    to (nearly) its current end. Returns (entries kept, offset in the old log
    copied up to). Raises OSError or Aborted; the caller removes `path`.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, encode_header(base_revision))
        kept = _write_entries(fd, keys, entries, now, abort)
        # The bulk is synced here, off the writer thread, so the sync at the
        # switch only has the remainder to flush.
        sync_file(fd)
        copied_to = _catch_up(fd, log_path, start, log_end, abort)
    except BaseException:
        os.close(fd)
        remove_if_present(path)
        raise
    os.close(fd)
    return kept, copied_to


def _write_entries(
    fd: int, keys: Iterable[str], entries: Mapping[str, Any], now: float, abort: threading.Event
) -> int:
    """The live entries as "B" changes, a record of about RECORD_BYTES each."""
    kept = 0
    names: list[bytes] = []
    held: list[bytes] = []
    size = top = 0
    for key in keys:
        entry = entries[key]
        if entry[1] and EXPIRY_AT(entry, EXPIRY_OFFSET)[0] <= now:
            continue  # expired entries are dropped here, as at replay
        # As the cache holds it: replay puts it back without rendering it again.
        name = key.encode("utf-8")
        names.append(name)
        held.append(entry)
        top = max(top, revision_of(entry))
        size += len(name) + len(entry) + 8
        kept += 1
        if size >= RECORD_BYTES:
            write_all(fd, frame(encode_block(names, held, top)))
            names, held, size, top = [], [], 0, 0
            if abort.is_set():
                raise Aborted()
    if names:
        write_all(fd, frame(encode_block(names, held, top)))
    return kept


def _catch_up(
    fd: int, log_path: str, start: int, log_end: Callable[[], int], abort: threading.Event
) -> int:
    source = os.open(log_path, os.O_RDONLY)
    try:
        for _ in range(CATCH_UP_ROUNDS):
            end = log_end()  # only whole, written records lie before it
            if end - start <= CATCH_UP_LEFT:
                break
            copy_range(source, fd, start, end)
            start = end
            if abort.is_set():
                raise Aborted()
    finally:
        os.close(source)
    return start
