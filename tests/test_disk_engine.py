"""
The disk engine in this process, on the real reactor and a real file system:
a cache and committer in front of it as the service builds them, and a fresh
engine over the same directory standing in for a restart.
"""

import os
import random
import shutil

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.logger import formatEvent, globalLogPublisher

from dache.engines import SET, Change, EngineUnavailable, compaction
from dache.engines.disk import LOG_NAME, DiskEngine, repair
from dache.engines.disklog import FRAME, HEADER, Entries, decode_changes, encode_block, frame, scan
from dache.errors import StartupError
from dache.rendering import render_key
from dache.store.cache import (
    Cache,
    body_of,
    render_entry,
    revision_of,
    value_json_of,
    value_of,
)
from dache.store.committer import Committer


class Node:
    """Engine -> cache -> committer, wired as dache.service wires them."""

    def __init__(self, directory, entries=True, **options):
        self.directory = str(directory)
        self.engine = DiskEngine(self.directory, reactor, **options)
        self.cache = Cache()
        self.committer = None
        if entries:  # compacted entries put back as they are, as dache.service does
            self.engine.load_entries = self.cache.put_many

    async def open(self):
        await self.engine.load(self._apply)
        self.engine.attach(self.cache)
        revision = max(self.cache.max_revision(), self.engine.revision)
        self.committer = Committer(self.engine, self.cache, reactor, 30.0, revision)
        return self

    def _apply(self, change):
        if change.kind == SET:
            self.cache.set(change.key, change.value_json, change.expiry, change.revision)
        else:
            self.cache.delete(change.key)

    def set(self, key, value_json, expiry=None):
        return self.committer.submit(Change.set(key, value_json, expiry))

    def delete(self, key):
        return self.committer.submit(Change.delete(key))

    def content(self):
        """What GET would serve: key -> (body, revision)."""
        now = reactor.seconds()
        return {
            k: (body_of(e), revision_of(e)) for k, e in self.cache.items() if self.cache.get(k, now)
        }

    async def close(self):
        await self.committer.drain()
        await self.engine.close()

    @property
    def log_path(self):
        return os.path.join(self.directory, LOG_NAME)


async def opened(directory, **options):
    return await Node(directory, **options).open()


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("entries", [True, False], ids=["as entries", "as changes"])
async def test_a_compacted_log_serves_the_same_after_a_restart(tmp_path, entries):
    node = await opened(tmp_path)
    later = reactor.seconds() + 3600
    await node.set("plain", b'{"a":[1,2]}')
    await node.set('clé/ü "quoted"', b'"v\xc3\xa9"', float(int(later)) + 0.25)
    await node.set("int expiry", b"7", int(later))  # rendered as an integer, as given
    await node.set("gone", b"1")
    await node.delete("gone")
    served = node.content()
    assert await node.engine.compact()
    await node.close()
    again = await opened(tmp_path, entries=entries)
    assert again.content() == served  # the same bodies (expiry text included), revisions
    assert again.cache.used == node.cache.used
    assert await again.set("next", b"1") == 6  # after the delete (5): no revision reused
    await again.close()


@pytest.fixture
def log_lines():
    lines = []

    def observe(event):
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def record_offsets(path):
    """Offsets at which the log's records start."""
    data = open(path, "rb").read()
    offsets, offset = [], HEADER.size
    while offset < len(data):
        offsets.append(offset)
        offset += FRAME.size + FRAME.unpack_from(data, offset)[0]
    return offsets


FUTURE = 4_000_000_000


@pytest_twisted.ensureDeferred
async def test_content_and_revisions_are_identical_after_a_restart(tmp_path):
    node = await opened(tmp_path)
    await node.set("plain", b'"v"')
    await node.set("a/b c%ü", b'{"n":[1,2.5,null]}', FUTURE + 0.5)
    await node.set("int expiry", b"true", FUTURE)
    await node.set("overwritten", b"1")
    await node.set("overwritten", b"2")
    await node.set("deleted", b"0")
    last = await node.delete("deleted")  # the last revision handed out is a delete's
    before = node.content()
    await node.close()

    again = await opened(tmp_path)
    assert again.content() == before
    assert body_of(again.cache.get("int expiry", 0)).startswith(
        b'{"key":"int expiry","expiry":4000000000,'
    )
    assert "deleted" not in again.cache
    assert await again.set("next", b"1") == last + 1  # revisions go on, never reused
    await again.close()


@pytest_twisted.ensureDeferred
async def test_expired_entries_are_skipped_at_replay(tmp_path):
    node = await opened(tmp_path)
    await node.set("k", b'"old value"')
    await node.set("k", b'"expired"', reactor.seconds() - 1)
    await node.set("kept", b"1", FUTURE)
    await node.close()
    again = await opened(tmp_path)
    assert "k" not in again.cache  # neither the expired set nor the value before it
    assert list(again.content()) == ["kept"]
    await again.close()


@pytest_twisted.ensureDeferred
async def test_a_cut_at_every_offset_inside_the_last_record_keeps_every_earlier_one(
    tmp_path, log_lines
):
    node = await opened(tmp_path / "original")
    await node.set("first", b'"one"')
    await node.delete("nothing")
    kept = node.content()
    await node.set("last", b'"the record that gets cut"')
    await node.close()
    data = open(node.log_path, "rb").read()
    last = record_offsets(node.log_path)[-1]

    for end in range(last + 1, len(data)):
        directory = tmp_path / f"cut-{end}"
        directory.mkdir()
        (directory / LOG_NAME).write_bytes(data[:end])
        del log_lines[:]
        again = await opened(directory)
        assert again.content() == kept, end
        assert os.path.getsize(again.log_path) == last  # the torn bytes are gone
        assert any(f"dropped {end - last} bytes at offset {last}" in line for line in log_lines)
        await again.set("after", b"1")  # and the log takes writes after the cut
        await again.close()
        reopened = await opened(directory)
        assert "after" in reopened.content()
        await reopened.close()


@pytest_twisted.ensureDeferred
async def test_damage_to_compacted_entries_is_refused_at_its_offset_and_a_torn_tail_cut(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(compaction, "RECORD_BYTES", 1024)  # the entries in several records
    node = await opened(tmp_path)
    for i in range(40):
        await node.set(f"k{i:02d}", b'"%b"' % (b"v" * 100))
    assert await node.engine.compact()
    served = node.content()
    await node.close()
    offsets = record_offsets(node.log_path)
    assert len(offsets) >= 4 and scan(node.log_path).problem is None
    data = open(node.log_path, "rb").read()

    damaged = bytearray(data)
    damaged[offsets[1] + FRAME.size + 30] ^= 0x01  # inside the second record of entries
    open(node.log_path, "wb").write(damaged)
    with pytest.raises(StartupError) as refused:
        await opened(tmp_path)
    assert f"{node.log_path} is corrupt at offset {offsets[1]}" in str(refused.value)
    assert f"corrupt at offset {offsets[1]}" in repair(str(tmp_path))
    kept = await opened(tmp_path)
    first = kept.content()
    assert first and first == {k: served[k] for k in first}  # the first record's entries
    await kept.close()

    open(node.log_path, "wb").write(data[: offsets[-1] + 40])  # the last record cut short
    again = await opened(tmp_path)
    content = again.content()
    assert len(content) < len(served) and content == {k: served[k] for k in content}
    await again.close()


@pytest_twisted.ensureDeferred
async def test_corruption_in_the_middle_stops_start_up_and_repair_keeps_the_prefix(tmp_path):
    node = await opened(tmp_path)
    for i in range(5):
        await node.set(f"k{i}", b'"%d"' % i)
    prefix = {k: v for k, v in node.content().items() if k in ("k0", "k1")}
    await node.close()
    third = record_offsets(node.log_path)[2]
    data = bytearray(open(node.log_path, "rb").read())
    data[third + FRAME.size + 4] ^= 0x40  # inside k2's record, which has records after it
    open(node.log_path, "wb").write(data)

    with pytest.raises(StartupError) as refused:
        await opened(tmp_path)
    message = str(refused.value)
    assert f"{node.log_path} is corrupt at offset {third}" in message
    assert "--repair" in message and "\n" not in message

    said = repair(str(tmp_path))  # the refused engine let go of the directory
    assert f"corrupt at offset {third}" in said
    backups = [p for p in os.listdir(tmp_path) if p.startswith(LOG_NAME + ".corrupt-")]
    assert len(backups) == 1
    assert (tmp_path / backups[0]).read_bytes() == data
    assert os.path.getsize(node.log_path) == third

    again = await opened(tmp_path)
    assert again.content() == prefix
    await again.close()
    assert "intact" in repair(str(tmp_path))


@pytest_twisted.ensureDeferred
async def test_a_second_engine_on_the_same_directory_is_refused(tmp_path):
    first = await opened(tmp_path)
    with pytest.raises(StartupError) as refused:
        await opened(tmp_path)
    assert f"is in use by another dache process (pid {os.getpid()})" in str(refused.value)
    with pytest.raises(StartupError):
        repair(str(tmp_path))
    await first.close()
    second = await opened(tmp_path)  # free again once the first has closed
    await second.close()


@pytest_twisted.ensureDeferred
async def test_an_unusable_directory_stops_start_up_with_one_line(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(StartupError) as refused:
        await opened(tmp_path / "file" / "data")
    assert "DISK_PATH" in str(refused.value) and "cannot be created" in str(refused.value)


@pytest_twisted.ensureDeferred
async def test_check_reports_a_writable_log_and_a_closed_one(tmp_path):
    node = await opened(tmp_path)
    await node.set("k", b"1")
    health = await node.engine.check()
    assert health.ok, health.detail
    assert health.extra["path"] == node.log_path
    assert health.extra["fsync"] == "always"
    assert health.extra["log_bytes"] == os.path.getsize(node.log_path)
    assert health.extra["free_bytes"] > 0
    assert health.extra["seconds_since_fsync"] >= 0
    await node.close()
    assert not (await node.engine.check()).ok
    with pytest.raises(EngineUnavailable):
        await node.engine.write([Change.set("k", b"2")])


@pytest_twisted.ensureDeferred
async def test_everysec_and_no_acknowledge_before_fsync_and_sync_on_close(tmp_path):
    for mode in ("everysec", "no"):
        node = await opened(tmp_path / mode, fsync=mode)
        await node.set("k", b'"v"')
        assert node.engine._writer.unsynced  # acknowledged from the page cache
        await node.close()
        again = await opened(tmp_path / mode)
        assert value_of(again.cache.get("k", 0)) == "v"
        await again.close()


@pytest_twisted.ensureDeferred
async def test_compaction_under_concurrent_writes_and_deletes_loses_and_resurrects_nothing(
    tmp_path,
):
    node = await opened(tmp_path, compact_ratio=2.0, compact_min_bytes=256 << 10)
    rng = random.Random(4)
    value = b'"' + b"v" * 200 + b'"'
    keys = [f"key-{i}" for i in range(3000)]
    for start in range(0, len(keys), 500):  # a base big enough for compaction to take a while
        for key in keys[start : start + 500]:
            last = node.set(key, value)
        await last  # acknowledged in order: so are all before it

    model = {key: value for key in keys}  # what the acknowledged writes add up to
    acknowledged = {"total": 0, "while_compacting": 0}
    finished = Deferred()
    remaining = [6000]

    def submit_one():
        if remaining[0] == 0:
            return
        remaining[0] -= 1
        key = rng.choice(keys)
        if rng.random() < 0.3:
            change, result = node.delete(key), None
        else:
            result = b'{"n":%d}' % rng.randrange(10**9) + b" " * rng.randrange(300)
            change = node.set(key, result)
        change.addCallback(acknowledge, key, result)

    def acknowledge(_, key, result):
        if result is None:
            model.pop(key, None)
        else:
            model[key] = result
        acknowledged["total"] += 1
        if node.engine._compacting:
            acknowledged["while_compacting"] += 1
        if acknowledged["total"] == 6000:
            finished.callback(None)
        else:
            submit_one()

    for _ in range(32):  # 32 writes in flight at any time
        submit_one()
    explicit = node.engine.compact()
    await finished
    assert await explicit
    await node.engine.compact()  # and one more, after the last write
    assert node.engine.compactions >= 3
    assert acknowledged["while_compacting"] > 0  # writes went on during compaction

    assert {k: value_json_of(e) for k, e in node.cache.items()} == model
    written = node.engine.log_bytes
    await node.close()
    assert not os.path.exists(node.log_path + ".compact")
    again = await opened(tmp_path)
    assert {k: value_json_of(e) for k, e in again.cache.items()} == model
    assert os.path.getsize(again.log_path) == written
    await again.close()


@pytest_twisted.ensureDeferred
async def test_compaction_drops_expired_entries_and_deletes_and_keeps_the_revision(tmp_path):
    node = await opened(tmp_path)
    await node.set("live", b"1")
    await node.set("expired", b"2", reactor.seconds() - 1)
    for i in range(50):
        await node.set("churn", b"%d" % i)
    last = await node.delete("churn")
    before = os.path.getsize(node.log_path)
    assert await node.engine.compact()
    after = os.path.getsize(node.log_path)
    assert after < before / 5
    result = scan(node.log_path)
    assert (result.problem, result.changes, result.base_revision) == (None, 1, last)
    await node.close()
    again = await opened(tmp_path)
    assert list(again.content()) == ["live"]
    assert await again.set("next", b"1") == last + 1
    await again.close()


@pytest_twisted.ensureDeferred
async def test_compaction_writes_the_entries_in_key_order_as_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(compaction, "RECORD_BYTES", 512)  # the entries in several records
    node = await opened(tmp_path)
    keys = [f"k{i:03d}" for i in random.sample(range(100), 100)] + ["é", "Z", "a/b"]
    for key in keys:
        await node.set(key, b'"%b"' % key.encode())
    node.cache.index()  # a node keeps its key index: compaction writes in its order
    assert await node.engine.compact()
    await node.close()
    data = open(node.log_path, "rb").read()
    blocks = []
    for offset in record_offsets(node.log_path):
        length = FRAME.unpack_from(data, offset)[0]
        body = data[offset + FRAME.size : offset + FRAME.size + length]
        blocks += decode_changes(body, entries=True)
    assert len(blocks) > 3 and all(isinstance(block, Entries) for block in blocks)
    assert [key for block in blocks for key in block.keys] == sorted(keys)
    again = await opened(tmp_path)
    assert again.content() == node.content()
    await again.close()


@pytest_twisted.ensureDeferred
async def test_an_entry_that_expired_since_its_compaction_is_a_delete_at_replay(tmp_path):
    node = await opened(tmp_path)
    await node.set("k", b'"written before"')
    await node.close()
    past, future = reactor.seconds() - 1, reactor.seconds() + 3600
    entries = [render_entry(render_key(k), b"1", e, 9) for k, e in [("k", past), ("kept", future)]]
    with open(node.log_path, "ab") as log:
        log.write(frame(encode_block([b"k", b"kept"], entries, 9)))
    again = await opened(tmp_path)
    assert list(again.content()) == ["kept"]  # neither the expired entry nor the value before it
    assert again.cache.with_expiry == 1 and again.engine.revision == 9
    await again.close()


@pytest_twisted.ensureDeferred
async def test_a_compaction_left_over_from_a_crash_is_discarded(tmp_path):
    node = await opened(tmp_path)
    await node.set("k", b"1")
    await node.close()
    shutil.copyfile(node.log_path, node.log_path + ".compact")
    with open(node.log_path + ".compact", "ab") as f:
        f.write(b"half a compaction")
    again = await opened(tmp_path)
    assert not os.path.exists(node.log_path + ".compact")
    assert list(again.content()) == ["k"]
    await again.close()


@pytest_twisted.ensureDeferred
async def test_a_zero_filled_last_record_starts_and_the_warning_says_what_is_known(
    tmp_path, log_lines
):
    node = await opened(tmp_path / "original")
    await node.set("first", b'"one"')
    kept = node.content()
    await node.set("last", b'"zeroed by a power loss"')
    await node.close()
    data = open(node.log_path, "rb").read()
    last = record_offsets(node.log_path)[-1]

    for start in (last, last + 4, last + 8, last + 12, len(data) - 1):  # 4: just past the length
        directory = tmp_path / f"zeroed-{start}"
        directory.mkdir()
        (directory / LOG_NAME).write_bytes(data[:start] + bytes(4096))
        del log_lines[:]
        again = await opened(directory)
        assert again.content() == kept, start
        assert os.path.getsize(again.log_path) == last
        (warning,) = [line for line in log_lines if "torn last record" in line]
        assert "zero-filled from offset" in warning
        assert "with DISK_FSYNC=always it was never acknowledged" in warning
        assert "may have been" in warning  # not "never acknowledged" outright
        await again.close()
