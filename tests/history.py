"""
A history of operations against dache, and a checker for it.

Clients (each one sequential: one operation at a time) record every
operation: when it was invoked and when it completed
(time.monotonic() of the test process), through which node, on which key,
what was asked and what came back. Outcomes are `ok`, `fail` (definitely not
applied: 412, 4xx, a refused connection) or `unknown` (a timeout, a reset, a
503 on a write: it may or may not have taken effect, at any time after it was
invoked). Every write writes a value no other write uses, so a read names the
write it saw.

Per key, check() verifies what the README promises:

  lost       every acknowledged write is in the final state unless a write
             with a higher revision replaced it
  order      acknowledged writes' revisions increase in real-time order
  phantom    no read returns a value no write produced, or one whose write
             definitely failed, or a revision other than its write's
  back       no client sees a node go back to an older revision of a key
             (its own acknowledged writes included: read your writes)
  fork       no two successful If-Match writes name the same revision
  linear     the key's history on its home node (every write to a "home"
             key goes through one node, which also reads it) is
             linearizable as a register

Linearizability is checked against the write order the revisions give (the
README promises that revisions order a key's writes, and `order` checks it
against real time): with a known version order a register history is
linearizable exactly when no real-time edge A -> B (A completed before B was
invoked) goes from a higher version to a lower one, and no read completes
before the write it saw was invoked. That makes the check exact and linear in
the history's size (a sort and a sweep) instead of an exponential search; an
unknown write counts from its invocation on, forever (it has no completion),
and one nobody saw is left out, as it may never have happened.

Reads served by other nodes are eventually consistent: the checker measures
their lag (how long after a newer write was acknowledged a node still served
an older revision) instead of failing on it.

On an anomaly, dump() writes the offending key's history (the operations
around it) to a file whose name the assertion message gives.
"""

from __future__ import annotations

import bisect
import json
import os
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

OK, FAIL, UNKNOWN = "ok", "fail", "unknown"
SET, DELETE, READ = "set", "delete", "read"
ABSENT = None  # the value a read of a missing key returns
INFINITY = float("inf")


@dataclass
class Op:
    client: int
    node: str
    key: str
    kind: str  # set, delete or read
    invoke: float
    complete: float = INFINITY  # INFINITY while pending, and for unknown outcomes
    outcome: str = UNKNOWN
    value: str | None = None  # what a set wrote, or what a read returned (None: 404)
    revision: int | None = None  # from the ETag of the answer
    if_match: int | None = None  # the revision an If-Match write named
    status: int | None = None  # HTTP status, None when there was no answer
    note: str = ""  # why the outcome is what it is (an exception, a body)
    answered: float | None = None  # when the answer (or the error) came, whatever the outcome

    @property
    def is_write(self) -> bool:
        return self.kind in (SET, DELETE)


class History:
    """Operations as clients record them; safe to use from many threads."""

    def __init__(self) -> None:
        self.ops: list[Op] = []
        self._lock = threading.Lock()
        self._counter = 0

    def invoke(self, client: int, node: str, key: str, kind: str, **fields) -> Op:
        op = Op(client, node, key, kind, invoke=_now(), **fields)
        with self._lock:
            self.ops.append(op)
        return op

    def unique_value(self, client: int) -> str:
        with self._lock:
            self._counter += 1
            return f"c{client}-{self._counter}"

    @staticmethod
    def complete(op: Op, outcome: str, **fields) -> Op:
        for name, value in fields.items():
            setattr(op, name, value)
        op.outcome = outcome
        op.answered = _now()
        op.complete = op.answered if outcome != UNKNOWN else INFINITY
        return op


def _now() -> float:
    return time.monotonic()


@dataclass
class Anomaly:
    check: str
    key: str
    message: str
    ops: list[Op] = field(default_factory=list)  # the operations that show it


@dataclass
class Report:
    anomalies: list[Anomaly]
    counts: dict[str, int]  # "set ok", "read unknown", ...
    lag: list[float]  # seconds a non-home read was behind an acknowledged write
    keys: int

    def lag_quantile(self, q: float) -> float:
        if not self.lag:
            return 0.0
        ordered = sorted(self.lag)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def check(
    ops: Iterable[Op],
    final: dict[str, tuple[int | None, str | None]],
    home: dict[str, str] | None = None,
) -> Report:
    """
    Check a history. `final` maps each key to (revision, value) as every node
    serves it at the end, after faults healed and nodes converged (None, None
    for absent); `home` maps "home" keys to the node all their writes went
    through (for the linearizability check and lag measurement).
    """
    by_key: dict[str, list[Op]] = defaultdict(list)
    counts: dict[str, int] = defaultdict(int)
    for op in ops:
        by_key[op.key].append(op)
        counts[f"{op.kind} {op.outcome}"] += 1
    anomalies: list[Anomaly] = []
    lag: list[float] = []
    for key, key_ops in sorted(by_key.items()):
        writes = {op.value: op for op in key_ops if op.kind == SET}
        anomalies += _phantoms(key, key_ops, writes)
        anomalies += _order(key, key_ops)
        anomalies += _forks(key, key_ops)
        anomalies += _going_back(key, key_ops)
        if key in final:
            anomalies += _lost(key, key_ops, final[key], writes)
        if home and key in home:
            versioned = _versions(key_ops, writes)
            own = [op for op in versioned if op.node == home[key]]
            anomalies += _linearizable(key, own)
            lag += _lag(versioned, home[key])
    return Report(anomalies, dict(counts), lag, len(by_key))


def _phantoms(key: str, ops: list[Op], writes: dict[str, Op]) -> list[Anomaly]:
    found = []
    for read in ops:
        if read.kind != READ or read.outcome != OK or read.value is ABSENT:
            continue
        write = writes.get(read.value)
        if write is None:
            found.append(Anomaly("phantom", key, f"read {read.value!r}: no write wrote it", [read]))
        elif write.outcome == FAIL:
            found.append(
                Anomaly("phantom", key, f"read {read.value!r}: its write failed", [write, read])
            )
        elif write.invoke > read.complete:
            found.append(
                Anomaly("phantom", key, f"read {read.value!r} before it was written", [write, read])
            )
        elif write.outcome == OK and write.revision != read.revision:
            message = (
                f"read {read.value!r} at revision {read.revision}, written at {write.revision}"
            )
            found.append(Anomaly("phantom", key, message, [write, read]))
    return found


def _order(key: str, ops: list[Op]) -> list[Anomaly]:
    """Acknowledged writes: one that completed before another was invoked has a lower revision."""
    acked = [op for op in ops if op.is_write and op.outcome == OK and op.revision is not None]
    return _sweep(key, "order", acked, acked, strict=True)


def _sweep(key: str, check: str, before: list[Op], after: list[Op], strict: bool) -> list[Anomaly]:
    """
    For each op B in `after`, the highest version among ops A in `before` that
    completed before B was invoked must be below (strict) or at most B's.
    """
    done = sorted(before, key=lambda op: op.complete)
    ends = [op.complete for op in done]
    best: list[Op] = []  # best[i]: the op of highest revision among done[: i + 1]
    for op in done:
        best.append(op if not best or op.revision > best[-1].revision else best[-1])
    found = []
    for op in after:
        i = bisect.bisect_left(ends, op.invoke)  # done[:i] completed before op was invoked
        if i == 0:
            continue
        earlier = best[i - 1]
        if earlier is op:
            continue
        if earlier.revision > op.revision or (strict and earlier.revision == op.revision):
            message = (
                f"{op.kind} at revision {op.revision} was invoked after a {earlier.kind} at "
                f"revision {earlier.revision} completed"
            )
            found.append(Anomaly(check, key, message, [earlier, op]))
    return found


def _forks(key: str, ops: list[Op]) -> list[Anomaly]:
    winners: dict[int, list[Op]] = defaultdict(list)
    for op in ops:
        if op.is_write and op.if_match is not None and op.outcome == OK:
            winners[op.if_match].append(op)
    return [
        Anomaly("fork", key, f"{len(won)} If-Match writes won revision {revision}", won)
        for revision, won in sorted(winners.items())
        if len(won) > 1
    ]


def _going_back(key: str, ops: list[Op]) -> list[Anomaly]:
    """Per client and node, in the client's order: revisions seen never decrease."""
    found = []
    seen: dict[tuple[int, str], Op] = {}
    for op in sorted(ops, key=lambda op: op.invoke):
        if op.outcome != OK or op.revision is None:
            continue
        if op.kind == READ and op.value is ABSENT:
            continue  # a 404 carries no revision
        last = seen.get((op.client, op.node))
        if last is not None and op.revision < last.revision:
            message = (
                f"client {op.client} saw {op.node} at revision {op.revision} "
                f"after revision {last.revision}"
            )
            found.append(Anomaly("back", key, message, [last, op]))
        else:
            seen[(op.client, op.node)] = op
    return found


def _lost(
    key: str, ops: list[Op], final: tuple[int | None, str | None], writes: dict[str, Op]
) -> list[Anomaly]:
    revision, value = final
    acked = [op for op in ops if op.is_write and op.outcome == OK and op.revision is not None]
    if not acked:
        return []
    latest = max(acked, key=lambda op: op.revision)
    if value is not None:
        write = writes.get(value)
        if write is None or write.outcome == FAIL:
            return [Anomaly("lost", key, f"the final value {value!r} was never written", acked)]
        if revision is not None and revision >= latest.revision:
            return []
        message = f"final revision {revision} is older than acknowledged {latest.revision}"
        return [Anomaly("lost", key, message, [latest, write])]
    # Absent at the end: the newest acknowledged write must be a delete, or an
    # in-doubt delete may have come after it.
    if latest.kind == DELETE:
        return []
    if any(op.kind == DELETE and op.outcome == UNKNOWN for op in ops):
        return []
    return [Anomaly("lost", key, f"acknowledged {latest.value!r} is gone at the end", [latest])]


def _versions(ops: list[Op], writes: dict[str, Op]) -> list[Op]:
    """
    The key's operations with a version each, for the linearizability check:
    a write's revision (an unknown one's from a read that saw it; one nobody
    saw is left out), a read's revision, 0 for a read of the initial absence.
    Reads of an absence after deletes take the lowest version they can have
    (the least constraining choice). Failed operations are left out.
    """
    seen_revision: dict[str, int] = {}
    for op in ops:
        if op.kind == READ and op.outcome == OK and op.value is not ABSENT:
            seen_revision.setdefault(op.value, op.revision)
    versioned = []
    for op in ops:
        if op.outcome == FAIL:
            continue
        if op.kind == SET:
            revision = op.revision if op.outcome == OK else seen_revision.get(op.value)
            if revision is None:
                continue  # an in-doubt write nobody saw: it may never have happened
            versioned.append(_with_version(op, revision))
        elif op.kind == DELETE:
            if op.revision is not None:
                versioned.append(_with_version(op, op.revision))
        elif op.outcome == OK and op.value is not ABSENT:
            versioned.append(op)
    deletes = [op for op in versioned if op.kind == DELETE]
    in_doubt = [op for op in ops if op.kind == DELETE and op.revision is None]
    for op in ops:
        if op.kind == READ and op.outcome == OK and op.value is ABSENT:
            versioned.append(_absent_read(op, versioned, deletes, in_doubt))
    return versioned


def _with_version(op: Op, revision: int) -> Op:
    copy = Op(**asdict(op))
    copy.revision = revision
    return copy


def _absent_read(read: Op, versioned: list[Op], deletes: list[Op], in_doubt: list[Op]) -> Op:
    """
    A 404 has no revision: give it the lowest one it can have, that of a
    delete invoked before the read completed, at or above every write that
    completed before the read was invoked (0, the initial absence, when none
    did). With none, an in-doubt delete invoked before it may explain it;
    otherwise it gets 0, which the linearizability sweep reports.
    """
    floor = max(
        (op.revision for op in versioned if op.complete < read.invoke and op.kind != READ),
        default=0,
    )
    fitting = [op.revision for op in deletes if op.invoke < read.complete and op.revision >= floor]
    if floor == 0:
        version = 0
    elif fitting:
        version = min(fitting)
    elif any(op.invoke < read.complete for op in in_doubt):
        version = floor
    else:
        version = 0
    return _with_version(read, version)


def _linearizable(key: str, ops: list[Op]) -> list[Anomaly]:
    found = _sweep(key, "linear", ops, ops, strict=False)
    # a write and a read of the same version: the write comes first
    writes = {op.revision: op for op in ops if op.is_write}
    for op in ops:
        if op.kind == READ and op.revision:
            write = writes.get(op.revision)
            if write is not None and write.invoke > op.complete:
                found.append(Anomaly("linear", key, "read before its write", [write, op]))
    return found


def _lag(ops: list[Op], home: str) -> list[float]:
    """For reads by other nodes: how long after a newer write was acknowledged they were served."""
    acked = sorted(
        (op for op in ops if op.is_write and op.outcome == OK), key=lambda op: op.revision
    )
    revisions = [op.revision for op in acked]
    earliest = [INFINITY] * (len(acked) + 1)  # earliest[i]: first completion among acked[i:]
    for i in range(len(acked) - 1, -1, -1):
        earliest[i] = min(acked[i].complete, earliest[i + 1])
    lags = []
    for read in ops:
        if read.kind != READ or read.node == home:
            continue
        newer = earliest[bisect.bisect_right(revisions, read.revision)]
        lags.append(max(0.0, read.invoke - newer) if newer < read.invoke else 0.0)
    return lags


def dump(report: Report, ops: Iterable[Op], path: str, around: int = 20) -> str:
    """
    Write each anomaly with the operations on its key around it (`around` on
    each side, by invocation) to `path` as JSON lines; return a one-line summary.
    """
    ops = list(ops)
    by_key: dict[str, list[Op]] = defaultdict(list)
    for op in sorted(ops, key=lambda op: op.invoke):
        by_key[op.key].append(op)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as out:
        for anomaly in report.anomalies:
            key_ops = by_key[anomaly.key]
            first = min((key_ops.index(op) for op in anomaly.ops if op in key_ops), default=0)
            last = max((key_ops.index(op) for op in anomaly.ops if op in key_ops), default=0)
            context = key_ops[max(0, first - around) : last + around + 1]
            record = {
                "check": anomaly.check,
                "key": anomaly.key,
                "message": anomaly.message,
                "ops": [_jsonable(op) for op in anomaly.ops],
                "context": [_jsonable(op) for op in context],
            }
            out.write(json.dumps(record) + "\n")
    kinds = defaultdict(int)
    for anomaly in report.anomalies:
        kinds[anomaly.check] += 1
    return ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))


def _jsonable(op: Op) -> dict:
    record = asdict(op)
    if record["complete"] == INFINITY:
        record["complete"] = None
    return record


def assert_clean(report: Report, ops: Iterable[Op], directory: str) -> None:
    """Fail with the anomalies' file named when the history has any."""
    if report.anomalies:
        path = os.path.join(directory, "anomalies.jsonl")
        summary = dump(report, ops, path)
        first = report.anomalies[0]
        raise AssertionError(
            f"{len(report.anomalies)} anomalies ({summary}); first: {first.check} on "
            f"{first.key!r}: {first.message}; the offending history is in {path}"
        )
