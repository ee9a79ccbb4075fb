"""
bench.startup run for real at a smoke's size: dache's disk engine filled,
started on its log of writes, then compacted (bench.fill --compact) and
started again on the compacted log, each start loading every entry; and
report.py's issue-23 rows built from what it measured.
"""

from __future__ import annotations

import os

from bench import report, startup
from dache.engines.disklog import FRAME, HEADER, Entries, decode_changes

ENTRIES = 5_000


def first_record(log: str) -> list:
    """The changes of the log's first record (compacted entries as Entries)."""
    with open(log, "rb") as file:
        file.seek(HEADER.size)
        length = FRAME.unpack(file.read(FRAME.size))[0]
        return decode_changes(file.read(length), entries=True)


def test_a_start_is_timed_on_the_log_of_writes_and_again_once_it_is_compacted(tmp_path):
    result = startup.measure("disk", str(tmp_path), ENTRIES)
    assert result.error is None  # each start loaded all ENTRIES (loaded_seconds checks it)
    assert result.load_seconds is not None and result.compacted_load_seconds is not None
    assert result.compacted_listening_seconds is not None
    logs = [tmp_path / d / "dache.log" for d in os.listdir(tmp_path) if d.startswith("disk-")]
    filled = max(logs, key=os.path.getsize)  # the other one is the empty store's
    changes = first_record(str(filled))
    assert changes and all(isinstance(c, Entries) for c in changes)  # compacted: entries only

    rows = {t.what: t for t in report.density_targets(result)}
    assert "compacted log" in next(iter(rows))
    assert rows["load 1M entries, compacted log (disk)"].measured.startswith(
        f"{result.compacted_load_seconds:.2f} s for 5,000"
    )
