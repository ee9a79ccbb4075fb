"""
One cache entry as bytes: the layout the in-memory map holds (dache.store.cache)
and the disk engine's compacted log stores as it is ("R" changes, see
dache/engines/disk.py). Beside dache.rendering: every layer may read it.

An entry is one bytes object (no Python object, int or tuple of its own: a
cache holds millions of them): a short header, then the GET response body,
pre-rendered with the value's JSON text at its end, so a read is one dict
lookup and two slices (the ETag, the body):

    byte 0        h: where the body starts (and the ETag ends)
    byte 1        1 if the entry has an expiry, else 0
    byte 2        s: where the ETag starts (15 with an expiry, else 7)
    [3:7]         where the value's JSON starts (little-endian u32)
    [7:15]        the expiry (little-endian f64), only if byte 1 is 1
    [s:h]         the ETag as sent, the revision in quotes: "<revision>"
    [h:]          {"key":<key>,"expiry":<expiry>,"value":<value>}   ("expiry" only if set)

The functions below read it (body_of, etag_of, revision_of, expiry_of,
value_json_of, expiry_json_of); render_entry makes one. A change to this
layout is a new disk log version.
"""

from __future__ import annotations

import json
import struct
from operator import itemgetter

from dache.rendering import render_json

Entry = bytes  # the layout above

_OFFSET = struct.Struct("<I")
_OFFSET_EXPIRY = struct.Struct("<Id")
EXPIRY_AT = struct.Struct("<d").unpack_from
# Byte 0 and byte 1 of an entry, as C-level getters for map() over many entries
# (a compacted log's block at start-up).
BODY_AT = itemgetter(0)
HAS_EXPIRY = itemgetter(1)
_START_AT = _OFFSET.unpack_from
_KEY_PREFIX = 7  # {"key":
_VALUE_PREFIX = 9  # ,"value":
_EXPIRY_PREFIX = 10  # ,"expiry":
EXPIRY_OFFSET = 7
_PLAIN_TAG = 7  # where the ETag starts without an expiry
_EXPIRING_TAG = 15  # and with one


def render_entry(key_json: bytes, value_json: bytes, expiry: float | None, revision: int) -> Entry:
    """The entry of a key (as JSON text), a value's JSON text, its expiry and revision."""
    tag = b'"%d"' % revision
    if expiry is None:
        h = _PLAIN_TAG + len(tag)
        start = h + _KEY_PREFIX + len(key_json) + _VALUE_PREFIX
        return b'%c\x00\x07%b%b{"key":%b,"value":%b}' % (
            h,
            _OFFSET.pack(start),
            tag,
            key_json,
            value_json,
        )
    expiry_json = render_json(expiry)
    h = _EXPIRING_TAG + len(tag)
    start = h + _KEY_PREFIX + len(key_json) + _EXPIRY_PREFIX + len(expiry_json) + _VALUE_PREFIX
    return b'%c\x01\x0f%b%b{"key":%b,"expiry":%b,"value":%b}' % (
        h,
        _OFFSET_EXPIRY.pack(start, expiry),
        tag,
        key_json,
        expiry_json,
        value_json,
    )


def body_of(entry: Entry) -> bytes:
    """The GET response body: {"key":..,"value":..}."""
    return entry[entry[0] :]


def etag_of(entry: Entry) -> bytes:
    """The ETag header's value: the revision in quotes."""
    return entry[entry[2] : entry[0]]


def revision_of(entry: Entry) -> int:
    return int(entry[entry[2] + 1 : entry[0] - 1])


def expiry_of(entry: Entry) -> float | None:
    return EXPIRY_AT(entry, EXPIRY_OFFSET)[0] if entry[1] else None


def value_json_of(entry: Entry) -> bytes:
    """The value's JSON text, exactly as stored."""
    return entry[_START_AT(entry, 3)[0] : -1]


def expiry_json_of(entry: Entry) -> bytes | None:
    """The expiry's JSON text, as rendered in the body (None: no expiry)."""
    if not entry[1]:
        return None
    h = entry[0]
    start = entry.index(b',"expiry":', h) + _EXPIRY_PREFIX  # no key's JSON holds it unescaped
    return entry[start : _START_AT(entry, 3)[0] - _VALUE_PREFIX]


def value_of(entry: Entry) -> object:
    return json.loads(value_json_of(entry))


def body_length_of(entry: Entry) -> int:
    return len(entry) - entry[0]
