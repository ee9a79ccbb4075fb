"""The disk log's format and scan (dache/engines/disklog.py), on real files."""

import os

import pytest

from dache.engines import DELETE, SET, Change
from dache.engines.disklog import (
    FRAME,
    HEADER,
    LogWriter,
    create_log,
    decode_changes,
    encode_change,
    encode_header,
    encode_record,
    scan,
)


def changes(*specs):
    """("set", key, value_json, expiry, revision) / ("delete", key, revision)."""
    out = []
    for spec in specs:
        if spec[0] == SET:
            out.append(Change(SET, spec[1], spec[2], spec[3], spec[4]))
        else:
            out.append(Change(DELETE, spec[1], None, None, spec[2]))
    return out


BATCHES = [
    changes((SET, "a", b'"alpha"', None, 1), (SET, "b/ü é", b'{"n":[1,2]}', 1.9e9 + 0.25, 2)),
    changes((DELETE, "a", 3), (SET, "int expiry", b"null", 1900000000, 4)),
    changes((SET, "c", b"[true,false]", None, 5), (DELETE, "b/ü é", 6), (SET, "d", b'""', None, 7)),
]


def write_log(path, batches=BATCHES, base_revision=0):
    with open(path, "wb") as f:
        f.write(encode_header(base_revision))
        for batch in batches:
            f.write(encode_record(batch))
    return path


def replayed(path):
    seen = []
    result = scan(str(path), seen.append)
    return result, seen


def test_changes_round_trip_exactly_including_an_integer_expiry():
    for batch in BATCHES:
        body = b"".join(encode_change(c) for c in batch)
        assert decode_changes(body) == batch
    (decoded,) = decode_changes(encode_change(BATCHES[1][1]))
    assert isinstance(decoded.expiry, int)


def test_a_scan_replays_every_change_in_order_and_reports_revisions(tmp_path):
    path = write_log(tmp_path / "log", base_revision=0)
    result, seen = replayed(path)
    assert result.problem is None
    assert seen == [c for batch in BATCHES for c in batch]
    assert (result.records, result.changes, result.max_revision) == (3, 7, 7)
    assert result.good_end == result.size == os.path.getsize(path)


def test_the_header_base_revision_counts_when_records_are_older(tmp_path):
    path = write_log(tmp_path / "log", batches=BATCHES[:1], base_revision=41)
    result, _ = replayed(path)
    assert (result.base_revision, result.max_revision) == (41, 41)


def test_a_cut_anywhere_in_the_last_record_is_a_torn_tail_keeping_the_rest(tmp_path):
    path = write_log(tmp_path / "log")
    data = path.read_bytes()
    last = len(data) - len(encode_record(BATCHES[-1]))
    cut = tmp_path / "cut"
    for end in range(last + 1, len(data)):
        cut.write_bytes(data[:end])
        result, seen = replayed(cut)
        assert result.problem is not None and result.problem.torn, end
        assert result.problem.offset == result.good_end == last
        assert seen == BATCHES[0] + BATCHES[1]


def test_a_zero_filled_tail_is_torn_and_so_is_a_garbled_last_record(tmp_path):
    path = write_log(tmp_path / "log")
    data = path.read_bytes()
    path.write_bytes(data + bytes(4096))  # file size grew, its data never reached the disk
    result, seen = replayed(path)
    assert result.problem.torn and result.problem.offset == len(data)
    assert len(seen) == 7

    garbled = bytearray(data)
    garbled[-3] ^= 0xFF  # the last record's last bytes
    path.write_bytes(bytes(garbled))
    result, seen = replayed(path)
    assert result.problem.torn and result.problem.reason == "record checksum mismatch"
    assert seen == BATCHES[0] + BATCHES[1]


@pytest.mark.parametrize(
    "where, reason",
    [
        (0, "record length checksum mismatch"),  # the length itself
        (5, "record length checksum mismatch"),  # the length's checksum
        (9, "record checksum mismatch"),  # the body's checksum
        (FRAME.size + 3, "record checksum mismatch"),  # the body
    ],
)
def test_damage_with_records_after_it_is_corruption_at_the_records_offset(tmp_path, where, reason):
    path = write_log(tmp_path / "log")
    data = bytearray(path.read_bytes())
    second = HEADER.size + len(encode_record(BATCHES[0]))
    data[second + where] ^= 0x01
    path.write_bytes(bytes(data))
    result, seen = replayed(path)
    assert not result.problem.torn
    assert result.problem.offset == second == result.good_end
    assert result.problem.reason == reason
    assert seen == BATCHES[0]


def test_a_damaged_or_foreign_header_is_corruption_at_offset_zero(tmp_path):
    path = write_log(tmp_path / "log")
    data = bytearray(path.read_bytes())
    data[12] ^= 0x01  # inside base_revision
    path.write_bytes(bytes(data))
    result, seen = replayed(path)
    assert (result.problem.offset, result.problem.torn) == (0, False)
    assert "header checksum" in result.problem.reason and seen == []

    path.write_bytes(b"not a dache log at all, but long enough")
    assert "bad magic" in replayed(path)[0].problem.reason

    path.write_bytes(b"")  # the one header fault a crash may leave
    assert replayed(path)[0].problem.torn


def test_create_log_writes_a_header_only_log(tmp_path):
    path = str(tmp_path / "log")
    create_log(path, base_revision=9)
    result, seen = replayed(path)
    assert (result.problem, result.base_revision, result.size, seen) == (None, 9, HEADER.size, [])
    assert not os.path.exists(path + ".new")


def test_the_writer_appends_records_synced_or_not(tmp_path):
    path = str(tmp_path / "log")
    create_log(path)
    writer = LogWriter(path, HEADER.size)
    end = writer.append(encode_record(BATCHES[0]), sync=True)
    assert end == os.path.getsize(path) and not writer.unsynced
    writer.append(encode_record(BATCHES[1]), sync=False)
    assert writer.unsynced
    writer.sync()
    assert not writer.unsynced
    writer.close()
    assert replayed(path)[1] == BATCHES[0] + BATCHES[1]
