"""
The disk engine: dache's own append-only log in one directory (DISK_PATH),
durable on one machine with no server to run, as Redis' append-only file.

Files in DISK_PATH
------------------
    dache.log                the log: replayed at start-up, appended to by every write
    dache.lock               flock()ed by the one dache process using the directory
    dache.log.compact        a compaction in progress (removed at start-up if left over)
    dache.log.corrupt-<UTC>  a backup kept by `twistd dache --repair`

The log format (version 3)
--------------------------
All integers are big-endian; CRC32C is the Castagnoli CRC (as iSCSI, ext4
and LevelDB use), computed by the google-crc32c package.

    log     := header record*
    header  := "DACHELOG"            8 bytes, magic
               version      u16      3 (versions 1 and 2 are read too: 2 has no "B",
                                     1 neither "B" nor "R")
               flags        u16      0
               base_rev     u64      highest revision already assigned when the
                                     file was made (a compaction drops deletes,
                                     whose revisions must not be handed out again)
               header_crc   u32      CRC32C of the 20 bytes before it
    record  := length       u32      bytes in body
               length_crc   u32      CRC32C of the 4 length bytes
               body_crc     u32      CRC32C of body
               body         change+  one committer batch, or part of a snapshot
    change  := "S" rev u64 key_len u32 value_len u32 key value          set
             | "E" rev u64 expiry f64 key_len u32 value_len u32 key value  set, expiry
             | "I" rev u64 expiry i64 key_len u32 value_len u32 key value  set, int expiry
             | "D" rev u64 key_len u32 key                              delete
             | "R" rev u64 key_len u32 entry_len u32 key entry          set, as held
             | "B" top_rev u64 n u32 key_len u32 * n entry_len u32 * n key * n entry * n
                                                                 n sets, as held

`key` is UTF-8, `value` the value's JSON text exactly as the API rendered it,
`expiry` unix seconds ("I" keeps an integer expiry an integer, so a GET after
a restart renders it as before). "B" is written by compaction only (version 2's
compaction wrote one "R" per entry): `entry` is the cache's entry exactly as it
holds it (dache/entry.py: a header with the ETag, the value's offset and the
expiry, then the rendered GET body), so the replay puts a block back with one
dict update, rendering nothing and with no Python loop per entry (1,000,000
entries: about 1.1 s, against 1.6 s as "R" changes and 2 s as "S" changes);
the entries are in key order, so the key index is built from sorted keys. `top_rev` is the highest
revision among them (each entry's own is its ETag); anything else reading the log
gets it back as a set. A batch is one record, so it is replayed
whole or not at all. The length has a checksum of its own so that damage to
it is told apart from a write cut short.

Writes and fsync (DISK_FSYNC)
-----------------------------
Each committer batch is one record: one write() and, with `always`, one
fdatasync(), on a single writer thread (so the reactor never waits for the
disk and batches land in order). The batch is acknowledged when that returns:

    always    204 after the fsync: nothing acknowledged is lost, even on power loss
    everysec  204 after the write; fsync once a second: a crash of dache loses
              nothing, a power loss or OS crash up to about the last second
    no        204 after the write; the OS flushes when it likes (typically within
              30 s on Linux): a crash of dache loses nothing, a power loss more

A write that fails (disk full, file too large, I/O error) answers its batch
with EngineUnavailable (503) and is cut back off the log, so it never comes
back on replay; the next batch tries again.

Recovery
--------
At start-up the log is replayed oldest first; sets whose expiry has passed are
replayed as deletes. A bad record that is the last thing in the file is a
torn tail, the write a crash or power loss interrupted: cut short, a failing
checksum with only zeros after the record, or zeros from any byte of the
record on (a file size that reached the disk before its data: zeros from a
block boundary, possibly just after the length field). It is cut off with a
warning saying how many bytes were dropped and that it was acknowledged only
if DISK_FSYNC was not `always`. A bad record with data after it, or a frame
header that is neither valid nor a zero-filled prefix of one, is damage:
start-up stops with one line naming the file and offset, and
`twistd dache --repair` keeps a backup and truncates the log there.

Compaction
----------
When the log is over DISK_COMPACT_MIN_BYTES and over DISK_COMPACT_RATIO times
the live data (as the cache counts its bytes), the live entries are written
to dache.log.compact on a thread of its own (dropping expired ones), then the
records written to the log meanwhile are copied after them, and the writer
thread, between two batches, copies the last few, fsyncs, renames it over
dache.log and fsyncs the directory. Writes are acknowledged throughout.
"""

from __future__ import annotations

import fcntl
import gc
import os
import shutil
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from dache.engines import SET, Change, EngineHealth, EngineUnavailable, compaction
from dache.engines.disklog import (
    HEADER,
    Entries,
    LogFormatError,
    LogWriter,
    Problem,
    create_log,
    encode_record,
    remove_if_present,
    scan,
    sync_directory,
    sync_file,
    truncate,
)
from dache.entry import EXPIRY_AT, EXPIRY_OFFSET, HAS_EXPIRY
from dache.errors import StartupError

FSYNC_MODES = ("always", "everysec", "no")
LOG_NAME = "dache.log"
LOCK_NAME = "dache.lock"
COMPACTING = ".compact"
CHECK_TIMEOUT = 2.0  # seconds a health check waits for the writer thread
COMPACTION_RETRY = 60.0  # seconds before compacting again after a failure
# What a torn tail tells: its write did not reach the disk whole. Whether it
# was acknowledged depends on the DISK_FSYNC it was written with, which the
# log does not record, so the line says both cases rather than guessing.
TORN_MEANING = (
    "a write that did not reach the disk whole (crash or power loss); with "
    "DISK_FSYNC=always it was never acknowledged, with everysec or no it may "
    "have been"
)


class DiskEngine:
    name = "disk"
    log = Logger()

    def __init__(
        self,
        directory: str,
        reactor: Any,
        fsync: str = "always",
        compact_ratio: float = 2.0,
        compact_min_bytes: int = 64 << 20,
    ):
        if fsync not in FSYNC_MODES:
            raise ValueError(f"fsync must be one of {FSYNC_MODES}")
        self.directory = os.path.abspath(directory)
        self.path = os.path.join(self.directory, LOG_NAME)
        self.reactor = reactor
        self.fsync = fsync
        self.compact_ratio = compact_ratio
        self.compact_min_bytes = compact_min_bytes
        self.revision = 0  # highest revision in the log; the committer goes on from it
        # Set by a loader that takes "B" and "R" changes (entries as the cache
        # holds them, written by compaction) as they are: (keys, entries, highest
        # revision), a record's at once; else load() hands them over as SET Changes.
        self.load_entries: Callable[[list[str], list[bytes], int], None] | None = None
        self.log_bytes = 0  # the log's size past the last batch acknowledged
        self.compactions = 0
        self.write_error: str | None = None
        self.sync_error: str | None = None
        self.last_sync: float | None = None  # reactor time of the last good fsync
        self._lock_fd: int | None = None
        self._writer: LogWriter | None = None
        self._writer_thread: ThreadPool | None = None
        self._compactor_thread: ThreadPool | None = None
        self._syncer: LoopingCall | None = None
        self._threads: list[tuple[ThreadPool, Any]] = []
        self._cache: Any = None
        self._compacting = False
        self._compaction_waiters: list[Deferred[bool]] = []
        self._compact_not_before = 0.0
        self._abort = threading.Event()
        self._closed = False

    @classmethod
    def from_config(cls, config: Any, reactor: Any) -> DiskEngine:
        return cls(
            config.disk_path,
            reactor,
            fsync=config.disk_fsync,
            compact_ratio=config.disk_compact_ratio,
            compact_min_bytes=config.disk_compact_min_bytes,
        )

    # -- start-up

    def load(self, apply: Callable[[Change], None]) -> Deferred[None]:
        try:
            self._open(apply)
        except OSError as e:
            self._unlock()
            return fail(StartupError(f"disk engine: {e.filename or self.path}: {e.strerror}"))
        except BaseException:
            self._unlock()
            return fail()
        return succeed(None)

    def _open(self, apply: Callable[[Change], None]) -> None:
        try:
            if not os.path.isdir(self.directory):
                os.makedirs(self.directory)
                # A new directory's own entry must be durable too, or a power
                # loss could take it, and every write acknowledged in it, away.
                sync_directory(os.path.dirname(self.directory))
        except OSError as e:
            raise StartupError(
                f"DISK_PATH {self.directory} cannot be created: {e.strerror}"
            ) from None
        self._lock_fd = lock_directory(self.directory)
        remove_if_present(self.path + COMPACTING)
        if not os.path.exists(self.path):
            create_log(self.path)
            self.log.info("created a new log at {path}", path=self.path)

        now = self.reactor.seconds()

        def replay(change: Change) -> None:
            if change.kind == SET and change.expiry is not None and change.expiry <= now:
                change = Change.delete(change.key)  # expired: never served again
            apply(change)

        load_entries = self.load_entries

        def replay_entries(loaded: Entries) -> None:
            keys, entries = loaded.keys, loaded.entries
            flags = bytes(map(HAS_EXPIRY, entries))
            if 1 in flags:  # expired ones are deletes: never served again
                expired = [
                    i
                    for i, has_expiry in enumerate(flags)
                    if has_expiry and EXPIRY_AT(entries[i], EXPIRY_OFFSET)[0] <= now
                ]
                if expired:
                    for i in expired:
                        apply(Change.delete(keys[i]))
                    gone = set(expired)
                    keys = [key for i, key in enumerate(keys) if i not in gone]
                    entries = [entry for i, entry in enumerate(entries) if i not in gone]
            load_entries(keys, entries, loaded.top)  # type: ignore[misc]

        began = time.monotonic()
        # Replay makes millions of objects that all live on: collecting
        # garbage among them as they arrive costs a quarter of the time.
        collecting = gc.isenabled()
        gc.disable()
        try:
            result = scan(self.path, replay, None if load_entries is None else replay_entries)
        finally:
            if collecting:
                gc.enable()
        problem = result.problem
        if problem is not None and not problem.torn:
            raise StartupError(corruption_message(self.path, problem, result.size))
        if problem is not None:
            self._cut_torn_tail(problem, result.size)
        self.revision = result.max_revision
        self.log_bytes = max(result.good_end, HEADER.size)
        self.log.info(
            "replayed {path}: {changes} changes in {records} records, {size} bytes, "
            "in {seconds:.3f}s; fsync={fsync}",
            path=self.path,
            changes=result.changes,
            records=result.records,
            size=self.log_bytes,
            seconds=time.monotonic() - began,
            fsync=self.fsync,
        )
        self._writer = LogWriter(self.path, self.log_bytes)
        self._writer_thread = self._start_thread("dache-disk-writer")
        self._compactor_thread = self._start_thread("dache-disk-compactor")
        if self.fsync == "everysec":
            self._syncer = LoopingCall(self._sync)
            self._syncer.clock = self.reactor
            self._syncer.start(1.0, now=False)

    def _cut_torn_tail(self, problem: Problem, size: int) -> None:
        if problem.offset < HEADER.size:
            create_log(self.path)
        else:
            truncate(self.path, problem.offset)
        self.log.warn(
            "{path}: dropped {dropped} bytes at offset {offset}, a torn last record "
            "({reason}): " + TORN_MEANING,
            path=self.path,
            dropped=size - problem.offset,
            offset=problem.offset,
            reason=problem.reason,
        )

    def attach(self, cache: Any) -> None:
        """The cache whose live entries compaction writes out (after load)."""
        self._cache = cache

    # -- writes

    def write(self, changes: list[Change]) -> Deferred[None]:
        if self._writer is None or self._closed:
            return fail(EngineUnavailable("the disk engine is not open"))
        if not changes:
            return succeed(None)
        try:
            record = encode_record(changes)
        except LogFormatError as e:
            return fail(EngineUnavailable(str(e)))
        revision = max(change.revision for change in changes)
        done: Deferred[None] = Deferred()
        d = self._on_writer(self._writer.append, record, self.fsync == "always")
        d.addCallbacks(
            self._appended, self._append_failed, callbackArgs=(done, revision), errbackArgs=(done,)
        )
        return done

    def _appended(self, end: int, done: Deferred[None], revision: int) -> None:
        self.log_bytes = end
        self.revision = max(self.revision, revision)
        if self.write_error is not None:
            self.log.info("writes to {path} succeed again", path=self.path)
            self.write_error = None
        if self.fsync == "always":
            self._synced(None)
        # The committer applies the batch to the cache in this callback; after
        # it the cache holds exactly the log up to log_bytes, which is what a
        # compaction snapshot needs.
        done.callback(None)
        self._maybe_compact()

    def _append_failed(self, failure: Failure, done: Deferred[None]) -> None:
        error = failure.value
        if isinstance(error, OSError):
            reason = error.strerror or str(error)
        else:
            self.log.failure("unexpected error writing {path}", failure, path=self.path)
            reason = "unexpected error; see the server log"
        if self.write_error is None:
            self.log.error(
                "writing {path} failed: {reason}; writes get 503 until one succeeds",
                path=self.path,
                reason=reason,
            )
        self.write_error = reason
        done.errback(EngineUnavailable(f"the disk engine could not write its log: {reason}"))

    def _sync(self) -> Deferred[None]:
        """everysec: fsync what was written in the last second (on the writer thread)."""
        assert self._writer is not None
        d = self._on_writer(self._writer.sync)
        d.addCallbacks(self._synced, self._sync_failed)
        return d

    def _synced(self, _: object) -> None:
        self.last_sync = self.reactor.seconds()
        if self.sync_error is not None:
            self.log.info("fsync of {path} succeeds again", path=self.path)
            self.sync_error = None

    def _sync_failed(self, failure: Failure) -> None:
        reason = getattr(failure.value, "strerror", None) or str(failure.value)
        if self.sync_error is None:
            self.log.error(
                "fsync of {path} failed: {reason}; writes acknowledged since the last "
                "good fsync may not survive a power loss",
                path=self.path,
                reason=reason,
            )
        self.sync_error = reason

    def _on_writer(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self.reactor, self._writer_thread, f, *args)

    # -- compaction

    def compact(self) -> Deferred[bool]:
        """Compact now; fires True once the compacted log is in use, False if not."""
        if self._writer is None or self._cache is None or self._closed:
            return succeed(False)
        waiter: Deferred[bool] = Deferred()
        self._compaction_waiters.append(waiter)
        if not self._compacting:
            self._start_compaction()
        return waiter

    def _maybe_compact(self) -> None:
        if self._compacting or self._cache is None or self._closed:
            return
        size = self.log_bytes
        if size < self.compact_min_bytes or size <= self.compact_ratio * self._cache.bytes:
            return
        if self.reactor.seconds() < self._compact_not_before:
            return
        self._start_compaction()

    def _start_compaction(self) -> None:
        assert self._writer is not None
        self._compacting = True
        # Taken on the reactor between two batches: the cache holds exactly
        # the log up to log_bytes, and later batches are in the log after it.
        entries = self._cache.entries()
        keys = self._cache.ordered_keys()  # taken with entries: the same keys
        start, before = self.log_bytes, self.log_bytes
        writer = self._writer
        self.log.info(
            "compacting {path}: {size} bytes, {entries} entries",
            path=self.path,
            size=before,
            entries=len(entries),
        )
        began = time.monotonic()
        compacted = self.path + COMPACTING
        d = deferToThreadPool(
            self.reactor,
            self._compactor_thread,
            compaction.compact,
            compacted,
            self.path,
            keys,
            entries,
            self.reactor.seconds(),
            self.revision,
            start,
            lambda: writer.good_end,
            self._abort,
        )
        del entries, keys
        d.addCallback(self._switch, compacted)
        d.addCallbacks(
            self._compacted,
            self._compaction_failed,
            callbackArgs=(before, began),
        )

    def _switch(self, result: tuple[int, int], compacted: str) -> Deferred[tuple[int, int]]:
        kept, copied_to = result
        if self._abort.is_set():
            remove_if_present(compacted)
            raise compaction.Aborted()
        assert self._writer is not None
        d = self._on_writer(self._writer.switch, compacted, copied_to)
        return d.addCallback(lambda end: (kept, end))

    def _compacted(self, result: tuple[int, int], before: int, began: float) -> None:
        kept, end = result
        # Every batch queued before the switch has been acknowledged by now
        # (the writer thread answers in order); later ones are in the new log.
        self.log_bytes = end
        self.compactions += 1
        self.log.info(
            "compacted {path}: {before} -> {after} bytes, {kept} live entries, in {seconds:.2f}s",
            path=self.path,
            before=before,
            after=end,
            kept=kept,
            seconds=time.monotonic() - began,
        )
        self._compaction_done(True)

    def _compaction_failed(self, failure: Failure) -> None:
        if failure.check(compaction.Aborted):
            self.log.info("compaction of {path} stopped: dache is stopping", path=self.path)
        elif failure.check(OSError):
            self._compact_not_before = self.reactor.seconds() + COMPACTION_RETRY
            self.log.error(
                "compaction of {path} failed: {reason}; the log is unchanged, "
                "next try in {retry:g}s",
                path=self.path,
                reason=failure.value.strerror or str(failure.value),
                retry=COMPACTION_RETRY,
            )
        else:
            self._compact_not_before = self.reactor.seconds() + COMPACTION_RETRY
            self.log.failure("compaction of {path} failed", failure, path=self.path)
        self._compaction_done(False)

    def _compaction_done(self, switched: bool) -> None:
        self._compacting = False
        waiters, self._compaction_waiters = self._compaction_waiters, []
        for waiter in waiters:
            waiter.callback(switched)

    # -- health and shutdown

    def check(self) -> Deferred[EngineHealth]:
        if self._writer is None or self._closed:
            return succeed(EngineHealth(ok=False, detail="the disk log is not open"))
        d = self._on_writer(self._writer.probe)
        d.addTimeout(CHECK_TIMEOUT, self.reactor)
        d.addCallbacks(self._health, self._no_health)
        return d

    def _health(self, filesystem: os.statvfs_result) -> EngineHealth:
        assert self._writer is not None
        problems = []
        if filesystem.f_flag & os.ST_RDONLY:
            problems.append(f"the file system holding {self.path} is read-only")
        if self.write_error is not None:
            problems.append(f"the last write failed: {self.write_error}")
        if self.sync_error is not None:
            problems.append(f"the last fsync failed: {self.sync_error}")
        if self._writer.dirty_tail or self._writer.directory_unsynced:
            problems.append("a failed write is not cut off the log yet")
        extra: dict[str, Any] = {
            "path": self.path,
            "fsync": self.fsync,
            "log_bytes": self.log_bytes,
            "free_bytes": filesystem.f_bavail * filesystem.f_frsize,
            "compacting": self._compacting,
            "compactions": self.compactions,
        }
        if self.last_sync is not None:
            extra["seconds_since_fsync"] = round(self.reactor.seconds() - self.last_sync, 3)
        if problems:
            return EngineHealth(ok=False, detail="; ".join(problems), extra=extra)
        return EngineHealth(ok=True, detail=f"{self.path} is writable", extra=extra)

    def _no_health(self, failure: Failure) -> EngineHealth:
        if isinstance(failure.value, OSError):
            detail = f"the disk log is not usable: {failure.value.strerror or failure.value}"
        else:
            detail = f"the disk writer did not answer within {CHECK_TIMEOUT:g}s"
        return EngineHealth(ok=False, detail=detail, extra={"path": self.path})

    @inlineCallbacks
    def close(self) -> Any:
        if self._closed:
            return
        self._closed = True
        if self._syncer is not None and self._syncer.running:
            self._syncer.stop()
        if self._compacting:
            self._abort.set()
            waiter: Deferred[bool] = Deferred()
            self._compaction_waiters.append(waiter)
            yield waiter
        if self._writer is not None:
            try:
                yield self._on_writer(self._writer.close)
            except OSError as e:
                self.log.error("closing {path} failed: {reason}", path=self.path, reason=e)
        for pool, trigger in self._threads:
            self.reactor.removeSystemEventTrigger(trigger)
            pool.stop()
        self._threads = []
        self._unlock()

    def _start_thread(self, name: str) -> ThreadPool:
        pool = ThreadPool(minthreads=1, maxthreads=1, name=name)
        pool.start()
        # Its thread would keep the process alive if close() never came.
        trigger = self.reactor.addSystemEventTrigger("during", "shutdown", pool.stop)
        self._threads.append((pool, trigger))
        return pool

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None


def lock_directory(directory: str) -> int:
    """flock DISK_PATH/dache.lock for this process; StartupError if another holds it."""
    path = os.path.join(directory, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        raise StartupError(
            f"DISK_PATH {directory} is in use by another dache process"
            + (f" (pid {holder})" if holder else "")
            + "; one process per directory"
        ) from None
    except OSError as e:
        os.close(fd)
        raise StartupError(f"cannot lock {path}: {e.strerror}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    return fd


def corruption_message(path: str, problem: Problem, size: int) -> str:
    return (
        f"{path} is corrupt at offset {problem.offset}: {problem.reason}. "
        "`twistd dache --repair` (with the same DISK_PATH) keeps a backup and truncates "
        f"the log there, dropping its last {size - problem.offset} bytes"
    )


# -- repair


def repair(directory: str) -> str:
    """
    Make the log in `directory` load again: a torn tail is cut off; at a bad
    record a backup of the whole file is kept and the log is truncated there.
    Returns one line saying what was done; StartupError if the directory is
    in use or the log cannot be repaired.
    """
    directory = os.path.abspath(directory)
    path = os.path.join(directory, LOG_NAME)
    if not os.path.exists(path):
        return f"there is no log at {path}; nothing to repair"
    lock_fd = lock_directory(directory)
    try:
        result = scan(path)
        problem = result.problem
        if problem is None:
            return f"{path} is intact: {result.records} records, {result.size} bytes"
        dropped = result.size - problem.offset
        if problem.torn:
            truncate(path, problem.offset)
            return (
                f"{path}: dropped {dropped} bytes at offset {problem.offset}, "
                f"a torn last record ({problem.reason}): {TORN_MEANING}"
            )
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        backup = f"{path}.corrupt-{stamp}"
        shutil.copyfile(path, backup)
        fd = os.open(backup, os.O_RDONLY)
        try:
            sync_file(fd)
        finally:
            os.close(fd)
        if problem.offset < HEADER.size:
            create_log(path)
        else:
            truncate(path, problem.offset)
        sync_directory(directory)
        return (
            f"{path} was corrupt at offset {problem.offset} ({problem.reason}); kept a "
            f"backup at {backup} and truncated the log there, dropping {dropped} bytes "
            f"and keeping {result.records} records"
        )
    except OSError as e:
        raise StartupError(f"repair of {path} failed: {e.strerror}") from None
    finally:
        os.close(lock_fd)


def repair_command(config: Any) -> int:
    """`twistd dache --repair`: repair DISK_PATH's log, print one line, exit status."""
    import sys

    try:
        sys.stdout.write(f"dache: {repair(config.disk_path)}\n")
        return 0
    except StartupError as e:
        sys.stderr.write(f"dache: {e}\n")
        return 1
