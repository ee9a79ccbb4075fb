"""The disk log's format and scan (dache/engines/disklog.py), on real files."""

import os

import pytest

from dache.engines import DELETE, SET, Change
from dache.engines.disklog import (
    FRAME,
    HEADER,
    Entries,
    LogWriter,
    create_log,
    decode_changes,
    encode_block,
    encode_change,
    encode_entry,
    encode_header,
    encode_record,
    frame,
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


def _last_record_offset(data):
    return len(data) - len(encode_record(BATCHES[-1]))


@pytest.mark.parametrize("extended_to", [None, 4096, 12288])
def test_a_last_record_zero_filled_from_any_byte_on_is_a_torn_tail(tmp_path, extended_to):
    # A power loss after the file size reached the disk but before its data
    # did leaves zeros from a block boundary, which can be any byte of the
    # last record, including just after its length field; the file may also
    # have grown to the end of a block.
    data = write_log(tmp_path / "log").read_bytes()
    last = _last_record_offset(data)
    path = tmp_path / "zeroed"
    for start in range(last, len(data)):
        size = extended_to or len(data)
        path.write_bytes(data[:start] + bytes(size - start))
        result, seen = replayed(path)
        assert result.problem is not None and result.problem.torn, start
        assert result.problem.offset == result.good_end == last, start
        assert seen == BATCHES[0] + BATCHES[1], start
        if size > start:  # the zeros start at the last non-zero byte's end
            zeros_from = max(last, len(data[:start].rstrip(b"\0")))
            assert f"zero-filled from offset {zeros_from}" in result.problem.reason, start


def test_zeros_just_after_the_length_field_are_torn_not_corrupt(tmp_path):
    data = write_log(tmp_path / "log").read_bytes()
    last = _last_record_offset(data)
    path = tmp_path / "zeroed"
    path.write_bytes(data[: last + 4] + bytes(len(data) - last - 4))
    result, _ = replayed(path)
    assert result.problem.torn
    assert result.problem.reason == (
        f"record length checksum mismatch; zero-filled from offset {last + 4}"
    )


GARBAGE = [b"\xde\xad\xbe\xef" * 3, b"\x00\x00\x00\x10garbage!!", bytes(range(1, 40))]


@pytest.mark.parametrize("garbage", GARBAGE)
def test_a_tail_of_other_garbage_is_still_corruption(tmp_path, garbage):
    data = write_log(tmp_path / "log").read_bytes()
    path = tmp_path / "garbage"
    path.write_bytes(data + garbage + bytes(64))
    result, seen = replayed(path)
    assert not result.problem.torn
    assert result.problem.offset == len(data) == result.good_end
    assert result.problem.reason == "record length checksum mismatch"
    assert len(seen) == 7


def test_a_wrong_length_checksum_followed_by_zeros_is_corruption(tmp_path):
    # The length landed whole but its checksum bytes are not the right ones:
    # not a prefix of the record that was being written, so not a torn tail.
    data = write_log(tmp_path / "log").read_bytes()
    last = _last_record_offset(data)
    damaged = bytearray(data[: last + 6] + bytes(len(data) - last - 6))
    damaged[last + 4] ^= 0x01
    path = tmp_path / "damaged"
    path.write_bytes(bytes(damaged))
    result, _ = replayed(path)
    assert not result.problem.torn and result.problem.offset == last


def test_an_entry_change_replays_as_the_cache_entry_or_as_a_set(tmp_path):
    from dache.rendering import render_key
    from dache.store.cache import render_entry

    path = str(tmp_path / "dache.log")
    create_log(path)
    entry = render_entry(render_key("k/é"), b"[1]", 1700000000, 9)  # an integer expiry
    with open(path, "ab") as log:
        log.write(frame(encode_entry("k/é".encode(), entry, 9)))
    given = []
    result = scan(path, given.append, given.append)
    assert given == [Entries(["k/é"], [entry], 9)] and result.max_revision == 9
    given.clear()
    scan(path, given.append)  # no taker of entries: a set like any other
    assert given == [Change(SET, "k/é", b"[1]", 1700000000, 9)]
    assert isinstance(given[0].expiry, int)


def rendered(*specs):
    """(key, value_json, expiry, revision): the keys, and their entries as held."""
    from dache.rendering import render_key
    from dache.store.cache import render_entry

    keys = [spec[0] for spec in specs]
    return keys, [render_entry(render_key(k), v, e, r) for k, v, e, r in specs]


BLOCK = rendered(
    ("a", b'"alpha"', None, 3),
    ("k/é ü", b"[1]", 1900000000, 11),  # an integer expiry stays one
    ("z", b'{"n":null}', 1.9e9 + 0.5, 7),
)


def test_a_block_of_entries_replays_at_once_or_as_sets(tmp_path):
    keys, entries = BLOCK
    path = str(tmp_path / "dache.log")
    create_log(path)
    with open(path, "ab") as log:
        log.write(frame(encode_block([k.encode() for k in keys], entries, 11)))
        log.write(encode_record(changes((DELETE, "a", 12))))
    given = []
    result = scan(path, given.append, given.append)
    assert given == [Entries(keys, entries, 11), Change(DELETE, "a", None, None, 12)]
    assert (result.problem, result.changes, result.max_revision) == (None, 4, 12)
    given.clear()
    scan(path, given.append)  # no taker of entries: each a set, its revision from its ETag
    assert given[:3] == [
        Change(SET, "a", b'"alpha"', None, 3),
        Change(SET, "k/é ü", b"[1]", 1900000000, 11),
        Change(SET, "z", b'{"n":null}', 1.9e9 + 0.5, 7),
    ]
    assert isinstance(given[1].expiry, int)


def test_adjacent_entry_changes_replay_together_and_an_empty_block_as_nothing():
    keys, entries = BLOCK
    body = b"".join(encode_entry(k.encode(), e, 5) for k, e in zip(keys, entries, strict=True))
    body += encode_change(Change(DELETE, "d", None, None, 6)) + encode_block([], [], 0)
    assert decode_changes(body, entries=True) == [
        Entries(keys, entries, 5),
        Change(DELETE, "d", None, None, 6),
        Entries([], [], 0),
    ]


@pytest.mark.parametrize(
    "body, reason",
    [
        (encode_block([b"k"], [b"entry"], 1)[:-1], "runs past the end"),
        (encode_block([b"k"], [b"entry"], 1)[:20], "undecodable"),
        (encode_block([b"\xff"], [b"entry"], 1), "undecodable"),  # a key that is not UTF-8
        (encode_block([b"k"], [b"entry"], 1), "undecodable"),  # not an entry
        (encode_block([b"a"], BLOCK[1][:1], 1) + b"?", "unknown change tag"),
    ],
    ids=["cut entry", "cut lengths", "bad key", "not an entry", "garbage after"],
)
def test_a_damaged_block_in_a_checksummed_record_is_corruption(tmp_path, body, reason):
    path = write_log(tmp_path / "log", BATCHES[:1])
    with open(path, "ab") as log:
        log.write(frame(body))  # the checksum is right: the damage was written so
        log.write(encode_record(BATCHES[1]))
    result, seen = replayed(path)
    assert not result.problem.torn and reason in result.problem.reason
    assert seen == BATCHES[0]
