"""
The disk engine's log file, below the reactor: encoding and decoding of the
format documented at the top of dache/engines/disk.py, the scan that replays
and checks a log, and LogWriter, which appends to it. Plain blocking Python,
no Twisted: the engine runs LogWriter's methods on its single writer thread.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import accumulate

import google_crc32c

from dache.engines import DELETE, SET, Change
from dache.entry import expiry_json_of, revision_of, value_json_of

MAGIC = b"DACHELOG"
VERSION = 3  # what this dache writes: 2 plus "B" changes
READABLE = (1, 2, 3)
# magic, version, flags, base revision, CRC32C of the preceding 20 bytes
HEADER = struct.Struct(">8sHHQI")
# body length, CRC32C of the 4 length bytes, CRC32C of the body
FRAME = struct.Struct(">III")
MAX_BODY = 0xFFFFFFFF

SET_PLAIN = ord("S")  # revision u64, key length u32, value length u32, key, value
SET_FLOAT_EXPIRY = ord("E")  # revision u64, expiry f64, key length u32, value length u32, ...
SET_INT_EXPIRY = ord("I")  # revision u64, expiry i64, key length u32, value length u32, ...
DELETE_KEY = ord("D")  # revision u64, key length u32, key
ENTRY = ord("R")  # revision u64, key length u32, entry length u32, key, the cache's entry
# highest revision u64, count u32, count key lengths u32, count entry lengths u32,
# the keys, the entries (as "R", many at once: decoded without a loop per entry)
BLOCK = ord("B")

_SET_PLAIN = struct.Struct(">BQII")
_SET_FLOAT = struct.Struct(">BQdII")
_SET_INT = struct.Struct(">BQqII")
_DELETE = struct.Struct(">BQI")
_ENTRY = struct.Struct(">BQII")
_BLOCK = struct.Struct(">BQI")

crc32c = google_crc32c.value


class LogFormatError(Exception):
    """A log (or one record in it) that does not decode; str() says why."""


# -- encoding


def encode_header(base_revision: int) -> bytes:
    head = HEADER.pack(MAGIC, VERSION, 0, base_revision, 0)[:-4]
    return head + struct.pack(">I", crc32c(head))


def encode_change(change: Change) -> bytes:
    key = change.key.encode("utf-8")
    if change.kind == DELETE:
        return _DELETE.pack(DELETE_KEY, change.revision, len(key)) + key
    return encode_set(key, change.value_json, change.expiry, change.revision)


def encode_set(key: bytes, value_json: bytes, expiry: float | None, revision: int) -> bytes:
    if expiry is None:
        head = _SET_PLAIN.pack(SET_PLAIN, revision, len(key), len(value_json))
    elif isinstance(expiry, int):
        # An integer expiry stays an integer, so GET renders it as it was given.
        head = _SET_INT.pack(SET_INT_EXPIRY, revision, expiry, len(key), len(value_json))
    else:
        head = _SET_FLOAT.pack(SET_FLOAT_EXPIRY, revision, expiry, len(key), len(value_json))
    return head + key + value_json


def encode_entry(key: bytes, entry: bytes, revision: int) -> bytes:
    """A set as the cache holds it (dache.store.cache's layout): replayed without rendering."""
    return _ENTRY.pack(ENTRY, revision, len(key), len(entry)) + key + entry


def encode_block(keys: list[bytes], entries: list[bytes], top: int) -> bytes:
    """Entries as the cache holds them, many in one change; `top`: their highest revision."""
    count = len(keys)
    lengths = struct.pack(f">{2 * count}I", *map(len, keys), *map(len, entries))
    return b"".join([_BLOCK.pack(BLOCK, top, count), lengths, *keys, *entries])


def frame(body: bytes) -> bytes:
    """One record: the frame header, then the body (encoded changes)."""
    if len(body) > MAX_BODY:
        raise LogFormatError(f"a record of {len(body)} bytes is over the 4 GiB limit")
    length = struct.pack(">I", len(body))
    return length + struct.pack(">II", crc32c(length), crc32c(body)) + body


def encode_record(changes: Iterable[Change]) -> bytes:
    return frame(b"".join(map(encode_change, changes)))


# -- decoding


def decode_header(data: bytes) -> int:
    """The base revision of a log whose first HEADER.size bytes are `data`."""
    if len(data) < HEADER.size:
        raise LogFormatError("the file header is incomplete")
    magic, version, _flags, base_revision, crc = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise LogFormatError("not a dache log (bad magic bytes)")
    if crc != crc32c(data[: HEADER.size - 4]):
        raise LogFormatError("file header checksum mismatch")
    if version not in READABLE:
        raise LogFormatError(
            f"log format version {version}; this dache reads versions 1 to {VERSION}"
        )
    return base_revision


class Entries:
    """
    Entries as the cache holds them ("B" and "R" changes), as replay hands them
    on: keys[i]'s entry is entries[i]; `top` is the highest revision among them.
    """

    __slots__ = ("keys", "entries", "top")

    def __init__(self, keys: list[str], entries: list[bytes], top: int):
        self.keys = keys
        self.entries = entries
        self.top = top

    def __len__(self) -> int:
        return len(self.keys)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Entries):
            return NotImplemented
        return (self.keys, self.entries, self.top) == (other.keys, other.entries, other.top)

    def __repr__(self) -> str:
        return f"Entries({self.keys!r}, {self.entries!r}, {self.top!r})"


def decode_changes(body: bytes, entries: bool = False) -> list[Change | Entries]:
    """
    The changes in one record's body (already checksummed). "B" and "R"
    changes are Entries when `entries` is true (adjacent "R" ones together),
    else one SET Change each.
    """
    changes: list[Change | Entries] = []
    position, end = 0, len(body)
    try:
        while position < end:
            tag = body[position]
            if tag == BLOCK:
                block, position = _decode_block(body, position)
                if entries:
                    changes.append(block)
                else:
                    changes.extend(map(_entry_change, block.keys, block.entries))
                continue
            if tag == ENTRY:
                _, revision, key_length, entry_length = _ENTRY.unpack_from(body, position)
                position += _ENTRY.size
                key = body[position : position + key_length].decode("utf-8")
                position += key_length
                entry = body[position : position + entry_length]
                position += entry_length  # past the end: refused below
                if not entries:
                    changes.append(_entry_change(key, entry, revision))
                    continue
                last = changes[-1] if changes else None
                if last.__class__ is Entries:
                    last.keys.append(key)  # type: ignore[union-attr]
                    last.entries.append(entry)  # type: ignore[union-attr]
                    last.top = max(last.top, revision)  # type: ignore[union-attr]
                else:
                    changes.append(Entries([key], [entry], revision))
                continue
            if tag == DELETE_KEY:
                _, revision, key_length = _DELETE.unpack_from(body, position)
                position += _DELETE.size
                key = body[position : position + key_length]
                position += key_length
                changes.append(Change(DELETE, key.decode("utf-8"), None, None, revision))
                continue
            if tag == SET_PLAIN:
                _, revision, key_length, value_length = _SET_PLAIN.unpack_from(body, position)
                expiry = None
                position += _SET_PLAIN.size
            elif tag == SET_FLOAT_EXPIRY:
                _, revision, expiry, key_length, value_length = _SET_FLOAT.unpack_from(
                    body, position
                )
                position += _SET_FLOAT.size
            elif tag == SET_INT_EXPIRY:
                _, revision, expiry, key_length, value_length = _SET_INT.unpack_from(body, position)
                position += _SET_INT.size
            else:
                raise LogFormatError(f"unknown change tag {tag:#04x}")
            key = body[position : position + key_length]
            position += key_length
            value = body[position : position + value_length]
            position += value_length
            changes.append(Change(SET, key.decode("utf-8"), value, expiry, revision))
    except (struct.error, ValueError, IndexError) as e:  # UnicodeDecodeError is a ValueError
        raise LogFormatError(f"undecodable change ({e})") from None
    if position != end:
        raise LogFormatError("a change runs past the end of its record")
    return changes


def _decode_block(body: bytes, position: int) -> tuple[Entries, int]:
    """The "B" change at `position`, and where the next change starts."""
    _, top, count = _BLOCK.unpack_from(body, position)
    position += _BLOCK.size
    lengths = struct.unpack_from(f">{2 * count}I", body, position)
    position += 8 * count
    key_ends = list(accumulate(lengths[:count], initial=0))
    keys_end = position + key_ends[-1]
    entry_ends = list(accumulate(lengths[count:], initial=keys_end))
    if entry_ends[-1] > len(body):
        raise LogFormatError("a change runs past the end of its record")
    key_bytes = body[position:keys_end]
    if key_bytes.isascii():  # one decode, then slices: a character is a byte
        text = key_bytes.decode("ascii")
        keys = list(map(text.__getitem__, map(slice, key_ends, key_ends[1:])))
    else:
        bounds = zip(key_ends, key_ends[1:], strict=False)
        keys = [key_bytes[a:b].decode("utf-8") for a, b in bounds]
    entries = list(map(body.__getitem__, map(slice, entry_ends, entry_ends[1:])))
    return Entries(keys, entries, top), entry_ends[-1]


def _entry_change(key: str, entry: bytes, revision: int | None = None) -> Change:
    expiry_json = expiry_json_of(entry)  # an integer expiry stays one, as "I" keeps it
    expiry = None if expiry_json is None else json.loads(expiry_json)
    if revision is None:
        revision = revision_of(entry)
    return Change(SET, key, value_json_of(entry), expiry, revision)


# -- scanning


@dataclass
class Problem:
    """Where a scan stopped: a torn tail (safe to cut) or corruption (not)."""

    offset: int  # where the bad record starts; everything before it is good
    torn: bool  # True: the last write, cut short; False: damage with data after it
    reason: str


@dataclass
class ScanResult:
    size: int  # bytes in the file
    good_end: int  # offset just past the last good record
    base_revision: int
    max_revision: int  # highest revision in the header or any record
    records: int
    changes: int
    problem: Problem | None


READ_CHUNK = 1 << 20


def _only_zeros_from(file: object, offset: int) -> bool:
    """Whether the file holds nothing but zero bytes from `offset` to its end."""
    file.seek(offset)
    while chunk := file.read(READ_CHUNK):
        if chunk.strip(b"\0"):
            return False
    return True


def _data_end(file: object, start: int, size: int) -> int:
    """The offset just past the last non-zero byte at or after `start` (`start` if none)."""
    end = size
    while end > start:
        begin = max(start, end - READ_CHUNK)
        file.seek(begin)
        chunk = file.read(end - begin).rstrip(b"\0")
        if chunk:
            return begin + len(chunk)
        end = begin
    return start


def _zero_filled(reason: str, zeros_from: int, size: int) -> str:
    if zeros_from >= size:
        return reason
    return f"{reason}; zero-filled from offset {zeros_from}"


def scan(
    path: str,
    on_change: Callable[[Change], None] | None = None,
    on_entries: Callable[[Entries], None] | None = None,
) -> ScanResult:
    """
    Read the log at `path` from the start, calling on_change for each change of
    each good record, oldest first, and say where (and why) it stops early.

    A record that is bad only because it is the last thing in the file is a
    torn tail: cut short, a checksum that fails with nothing but zeros after
    the record, or a record zero-filled from any byte on (a file size that
    reached the disk before its data leaves zeros from a block boundary, which
    may fall inside the frame header, just after the length). Any other bad
    record is corruption: garbage with data after it, or a frame header whose
    length checksum fails on bytes that are not a zeroed tail.

    With on_entries, "B" and "R" changes go to it as Entries (the entries as
    the cache holds them, a record's at once); without, to on_change as SET
    Changes.
    """
    with open(path, "rb", buffering=READ_CHUNK) as file:
        size = os.fstat(file.fileno()).st_size
        head = file.read(HEADER.size)
        try:
            base_revision = decode_header(head)
        except LogFormatError as e:
            # An empty file is the one header fault a crash can leave (logs
            # are created aside and renamed in); anything else is damage.
            return ScanResult(size, 0, 0, 0, 0, 0, Problem(0, size == 0, str(e)))
        result = ScanResult(size, HEADER.size, base_revision, base_revision, 0, 0, None)
        offset = HEADER.size
        while offset < size:
            result.problem = _read_record(file, offset, size, result, on_change, on_entries)
            if result.problem is not None:
                break
            offset = result.good_end
        return result


def _read_record(
    file: object,
    offset: int,
    size: int,
    result: ScanResult,
    on_change: Callable[[Change], None] | None,
    on_entries: Callable[[Entries], None] | None = None,
) -> Problem | None:
    """Read the record at `offset`; on success advance `result`, else say what is wrong."""
    head = file.read(FRAME.size)
    if len(head) < FRAME.size:
        return Problem(offset, True, "the last record's frame header is incomplete")
    length, length_crc, body_crc = FRAME.unpack(head)
    expected_length_crc = struct.pack(">I", crc32c(head[:4]))
    if head[4:8] != expected_length_crc:
        # Torn only if the data ends inside the length or its checksum (and
        # the checksum bytes that did land are the right ones): zeros after.
        zeros_from = _data_end(file, offset, size)
        written = zeros_from - offset
        landed = head[4:written] == expected_length_crc[: max(0, written - 4)]
        torn = written <= 4 or (written <= 8 and landed)
        reason = "record length checksum mismatch"
        return Problem(offset, torn, _zero_filled(reason, zeros_from, size) if torn else reason)
    end = offset + FRAME.size + length
    if end > size:
        zeros_from = _data_end(file, offset, size)
        reason = f"the last record is cut short ({size - offset} bytes)"
        return Problem(offset, True, _zero_filled(reason, zeros_from, size))
    body = file.read(length)
    if body_crc != crc32c(body):
        torn = end == size or _only_zeros_from(file, end)
        reason = "record checksum mismatch"
        if torn:
            reason = _zero_filled(reason, _data_end(file, offset, size), size)
        return Problem(offset, torn, reason)
    try:
        changes = decode_changes(body, on_entries is not None)
    except LogFormatError as e:
        return Problem(offset, False, str(e))
    top = 0
    count = 0
    for change in changes:
        if change.__class__ is Entries:
            on_entries(change)  # type: ignore[misc, arg-type]
            revision = change.top  # type: ignore[union-attr]
            count += len(change)  # type: ignore[arg-type]
        else:
            if on_change is not None:
                on_change(change)  # type: ignore[arg-type]
            revision = change.revision  # type: ignore[union-attr]
            count += 1
        if revision > top:
            top = revision
    if changes:
        result.max_revision = max(result.max_revision, top)
    result.records += 1
    result.changes += count
    result.good_end = end
    return None


# -- files


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written; OSError (ENOSPC, EFBIG, EIO...) otherwise."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def sync_file(fd: int) -> None:
    (getattr(os, "fdatasync", None) or os.fsync)(fd)


def sync_directory(directory: str) -> None:
    """Make a rename or a new file in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_log(path: str, base_revision: int = 0) -> None:
    """A new, empty log at `path`, durably: written aside, synced, renamed in."""
    temporary = path + ".new"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, encode_header(base_revision))
        sync_file(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    sync_directory(os.path.dirname(path) or ".")


def truncate(path: str, offset: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, offset)
        sync_file(fd)
    finally:
        os.close(fd)


def remove_if_present(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def copy_range(source_fd: int, target_fd: int, start: int, end: int) -> None:
    """Append bytes [start, end) of source to target (which is open for append)."""
    while start < end:
        chunk = os.pread(source_fd, min(READ_CHUNK, end - start), start)
        if not chunk:
            raise OSError(f"the log ended at {start} while copying up to {end}")
        write_all(target_fd, chunk)
        start += len(chunk)


class LogWriter:
    """
    The appending end of the log. Every method runs on the engine's single
    writer thread, so appends, syncs and the compaction switch happen in one
    order. `good_end` is the offset past the last record written whole (and
    synced, when the append asked for it); a failed append is cut back to it,
    so a batch answered with an error never comes back on replay.
    """

    def __init__(self, path: str, good_end: int):
        self.path = path
        self.directory = os.path.dirname(path) or "."
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        self.good_end = good_end
        self.unsynced = False  # bytes written since the last fsync
        self.dirty_tail = False  # a failed append could not be cut back yet
        self.directory_unsynced = False  # a switched-in log's rename is not durable yet

    def append(self, record: bytes, sync: bool) -> int:
        """Write one record (and fsync if `sync`); the log's new end. OSError if not."""
        if self.directory_unsynced:
            self._sync_directory()
        if self.dirty_tail:
            self._cut_back()
        try:
            write_all(self.fd, record)
            if sync:
                sync_file(self.fd)
        except OSError:
            try:
                self._cut_back()
            except OSError:
                self.dirty_tail = True  # try again before the next append
            raise
        self.good_end += len(record)
        self.unsynced = not sync
        return self.good_end

    def _cut_back(self) -> None:
        os.ftruncate(self.fd, self.good_end)
        sync_file(self.fd)  # the cut must outlive a power loss as well
        self.dirty_tail = False

    def sync(self) -> None:
        if self.unsynced:
            self.unsynced = False
            try:
                sync_file(self.fd)
            except OSError:
                self.unsynced = True
                raise

    def switch(self, compacted: str, copied_to: int) -> int:
        """
        Make the compacted file the log: append what was written to the old
        log since `copied_to`, fsync, rename over the log, fsync the
        directory. Returns the new end. On error the old log stays in use.
        """
        fd = os.open(compacted, os.O_WRONLY | os.O_APPEND)
        try:
            source = os.open(self.path, os.O_RDONLY)
            try:
                copy_range(source, fd, copied_to, self.good_end)
            finally:
                os.close(source)
            sync_file(fd)
            new_end = os.fstat(fd).st_size
            os.replace(compacted, self.path)
        except BaseException:
            os.close(fd)
            remove_if_present(compacted)
            raise
        old, self.fd = self.fd, fd
        self.good_end = new_end
        self.unsynced = False
        os.close(old)
        # Until the rename is durable a power loss could bring back the old
        # log, missing what is appended next: so no append before it is.
        self.directory_unsynced = True
        try:
            self._sync_directory()
        except OSError:
            pass  # the next append tries again, and fails while this does
        return new_end

    def _sync_directory(self) -> None:
        sync_directory(self.directory)
        self.directory_unsynced = False

    def probe(self) -> os.statvfs_result:
        """A round trip through the writer thread for health checks."""
        os.fstat(self.fd)
        return os.statvfs(self.directory)

    def close(self) -> None:
        try:
            if self.unsynced:
                sync_file(self.fd)
        finally:
            os.close(self.fd)
