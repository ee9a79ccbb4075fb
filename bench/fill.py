"""
Fill a durability engine with N entries through its own write() (so the
bench knows nothing of its storage format), configured from the environment
like dache itself:

    DURABILITY_ENGINE=disk DISK_PATH=... python -m bench.fill 1000000
    DURABILITY_ENGINE=disk DISK_PATH=... python -m bench.fill --compact

--compact loads the store into a cache as a node does and asks the engine to
compact it (the disk engine's compaction, which a node runs on its own once
its log outgrows DISK_COMPACT_RATIO x the live data), so a start-up can be
timed from a compacted log too.

Keys are "k0000000".."k{N-1}", values are JSON strings of VALUE_BYTES (100).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import react

from dache.config import resolve
from dache.engines import SET, Change, create_engine
from dache.store.cache import Cache

BATCH = 10_000
VALUE_BYTES = 100


def key_of(i: int) -> str:
    return f"k{i:07d}"


def value_json(value_bytes: int = VALUE_BYTES) -> bytes:
    return b'"' + b"x" * (value_bytes - 2) + b'"'


@inlineCallbacks
def fill(reactor: Any, entries: int) -> Any:
    config = resolve({}, os.environ)
    engine = create_engine(config, reactor)
    yield engine.load(lambda change: None)
    value = value_json()
    began = time.monotonic()
    revision = 0
    for start in range(0, entries, BATCH):
        batch = []
        for i in range(start, min(start + BATCH, entries)):
            revision += 1
            change = Change.set(key_of(i), value)
            change.revision = revision
            batch.append(change)
        yield engine.write(batch)
    yield engine.close()
    sys.stdout.write(f"filled {entries} entries in {time.monotonic() - began:.1f}s\n")


@inlineCallbacks
def compact(reactor: Any) -> Any:
    config = resolve({}, os.environ)
    engine = create_engine(config, reactor)
    cache = Cache()

    def apply(change: Change) -> None:
        if change.kind == SET:
            cache.set(change.key, change.value_json, change.expiry, change.revision)
        else:
            cache.delete(change.key)

    if hasattr(engine, "load_entries"):  # a log compacted before
        engine.load_entries = cache.put_many
    yield engine.load(apply)
    engine.attach(cache)
    began = time.monotonic()
    compacted = yield engine.compact()
    yield engine.close()
    if not compacted:
        sys.exit("the engine did not compact")
    sys.stdout.write(f"compacted {len(cache)} entries in {time.monotonic() - began:.1f}s\n")


def main() -> None:
    if sys.argv[1:] == ["--compact"]:
        react(compact)
    else:
        react(fill, (int(sys.argv[1]),))


if __name__ == "__main__":
    main()
