"""
Deciding a batch in commit order: preconditions, read-modify-writes (touch,
increment), reads inside a transaction, and all-or-nothing groups.

Whoever writes a batch decides it against the keys' state just before the
batch, then each change sees the ones before it: the committer against memory
(which holds every earlier batch: one is in flight at a time), the PostgreSQL
engine against the table once the batch's rows are locked (so nodes sharing
the table decide each key in one order and never lose an increment). Both
call decide() with their own lookup, so the rules live here once.

After decide(), every change is one of:
- rejected: `rejected = True`, `error` says why (None: its precondition
  failed), `revision` is the key's current revision (0: absent);
- a GET: `value_json`, `expiry`, `revision` hold the state it read (no
  `value_json`: absent); it is not written;
- a SET or DELETE to write, with the revision it will get. An UPDATE becomes
  the SET (or, for an expiry in the past, the DELETE) it amounts to.
A group's changes are rejected together when any of them is.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

from dache.engines import DELETE, GET, SET, UPDATE, Change
from dache.rendering import render_json

# A key's state: (value's JSON text, expiry, revision), or None when absent.
State = tuple[bytes, float | None, int] | None
Lookup = Callable[[str], State]

KEEP = "keep"  # Update.expiry: leave the expiry as it is


class KeyAbsent(Exception):
    """A touch of a key that does not exist."""


class NotANumber(Exception):
    """An increment of a value that is not a JSON number, or that would not stay finite."""


class Update:
    """What an UPDATE does: set the expiry (KEEP, None or an instant), add `increment`."""

    __slots__ = ("increment", "expiry")

    def __init__(self, increment: int | float | None = None, expiry: float | str | None = KEEP):
        self.increment = increment
        self.expiry = expiry

    def new_state(self, state: State, now: float) -> tuple[bytes, float | None] | None:
        """The value and expiry after this update, or None if the expiry deletes it."""
        if state is None and self.increment is None:
            raise KeyAbsent("key not found")
        value_json, expiry, _ = state if state is not None else (b"0", None, 0)
        if self.increment is not None:
            value_json = add(value_json, self.increment)
        if self.expiry != KEEP:
            expiry = self.expiry  # type: ignore[assignment]
        if expiry is not None and expiry <= now:
            if state is None:  # nothing there, and nothing would be: not a delete
                raise KeyAbsent("key not found")
            return None
        return value_json, expiry


def add(value_json: bytes, by: int | float) -> bytes:
    """value + by as JSON text; integers stay exact."""
    try:
        value = json.loads(value_json)
    except ValueError:  # e.g. an integer past Python's digit limit
        value = None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise NotANumber("the value is not a number; increment needs a numeric value")
    total = value + by
    if isinstance(total, float) and not math.isfinite(total):
        raise NotANumber("the incremented value would not be a finite number")
    return render_json(total)


class Group:
    """
    Changes that succeed or fail together (an atomic batch), kept adjacent in a
    batch. A range delete's group names its prefix: an engine shared by several
    nodes also deletes, in the same transaction, the keys under it that this
    node does not hold yet, and counts them in `extra`.
    """

    __slots__ = ("changes", "prefix", "extra")

    def __init__(self, changes: list[Change], prefix: str | None = None):
        self.changes = changes
        self.prefix = prefix
        self.extra = 0
        for change in changes:
            change.group = self

    @property
    def failed(self) -> list[int]:
        """The indexes of the changes that failed on their own account."""
        return [i for i, c in enumerate(self.changes) if c.rejected and c.error is not _ALONG]


class _Along(Exception):
    """A group member rejected only because another member failed."""


_ALONG = _Along("another change of the batch failed")


def reads_state(change: Change) -> bool:
    """Whether deciding the change needs its key's current state."""
    return change.conditional or change.kind == GET or change.kind == UPDATE


def decide(changes: list[Change], lookup: Lookup, first_revision: int, now: float) -> list[Change]:
    """Decide `changes` in order; answers the SETs and DELETEs to write, revisions assigned."""
    state: dict[str, State] = {}  # keys' state after the changes decided so far
    writes: list[Change] = []
    revision = first_revision
    i = 0
    while i < len(changes):
        group = changes[i].group
        unit = changes[i : i + len(group.changes)] if group is not None else changes[i : i + 1]
        i += len(unit)
        trial: dict[str, State] = {}  # this unit's own effect, kept only if all of it holds
        unit_writes = []
        for change in unit:
            key = change.key
            if key in trial:
                current = trial[key]
            elif key in state:
                current = state[key]
            elif reads_state(change):
                current = lookup(key)
            else:
                current = None  # a plain set or delete does not care
            try:
                after = _decide_one(change, current, revision, now)
            except (KeyAbsent, NotANumber) as e:
                change.rejected, change.error = True, e
                change.revision = 0 if current is None else current[2]
                continue
            if after is False:  # a precondition failed
                change.rejected = True
                change.revision = 0 if current is None else current[2]
                continue
            if change.kind != GET:
                trial[key] = after
                unit_writes.append(change)
                revision += 1
        if any(change.rejected for change in unit):
            for change in unit:
                if not change.rejected:
                    change.rejected, change.error = True, _ALONG
            revision -= len(unit_writes)
            continue
        state.update(trial)
        writes.extend(unit_writes)
    return writes


def _decide_one(change: Change, current: State, revision: int, now: float) -> State | bool:
    """Resolve one change against the key's current state: its state after, or False."""
    if change.conditional and not change.precondition_holds(
        None if current is None else current[2]
    ):
        return False
    if change.kind == GET:
        if current is None:
            change.value_json, change.expiry, change.revision = None, None, 0
        else:
            change.value_json, change.expiry, change.revision = current
        return current
    if change.kind == UPDATE:
        new = change.update.new_state(current, now)
        if new is None:
            change.kind, change.value_json, change.expiry = DELETE, None, None
        else:
            change.kind, (change.value_json, change.expiry) = SET, new
    change.revision = revision
    if change.kind == SET:
        assert change.value_json is not None
        return change.value_json, change.expiry, revision
    return None
