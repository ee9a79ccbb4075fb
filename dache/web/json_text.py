"""
A request body's top-level JSON object, member by member, with each member's
JSON text exactly as the client sent it: dache stores a value's text, not a
re-rendering of it, so `1e-400`, `-0`, `1.10` and a 5,000-digit integer come
back byte for byte.

Validation is the standard library's decoder (the C scanner), with two
differences from json.loads: NaN/Infinity are refused (not JSON), and an
integer too long for int() (the interpreter's 4,300-digit limit, which raises
ValueError, not JSONDecodeError) is read as a float, never an error: dache
only needs the number itself for "expiry" and "ttl".

A member's value may nest at most MAX_DEPTH levels of arrays and objects (a
documented constant): deeper documents are refused with 400 before the decoder recurses.
"""

from __future__ import annotations

import json
import re
import sys
from json.decoder import scanstring
from typing import Any

MAX_DEPTH = 256  # levels of [ and { a body may nest; README "Values"
_INT_DIGITS = sys.get_int_max_str_digits() or 4300


class BadJSON(ValueError):
    """The body is not what dache accepts; str() is for a person."""


def _reject_constant(name: str) -> None:
    raise BadJSON(f"{name} is not a JSON number")


def _int(text: str) -> int | float:
    # float() has no digit limit: a huge integer becomes a (possibly infinite) float.
    return int(text) if len(text) < _INT_DIGITS else float(text)


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_int=_int)
_scan_value = _DECODER.raw_decode
_SPACE = re.compile(r"[ \t\n\r]*")
_skip = _SPACE.match
# A string (skipped whole) or a bracket: enough to measure nesting.
_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


def depth(text: str) -> int:
    deepest = level = 0
    for match in _TOKENS.finditer(text):
        token = match.group()
        if token in "[{":
            level += 1
            deepest = max(deepest, level)
        elif token in "]}":
            level -= 1
    return deepest


def _check_depth(text: str) -> None:
    # The body's own object is one level above its members' values. Counting
    # brackets is cheap; only a body that could be too deep is scanned.
    limit = MAX_DEPTH + 1
    if text.count("[") + text.count("{") > limit and depth(text) > limit:
        raise BadJSON(f"a value is nested more than {MAX_DEPTH} levels deep")


def _why_invalid(text: str) -> BadJSON:
    """The decoder's own message for a malformed body."""
    try:
        document = _DECODER.decode(text)
    except BadJSON as e:
        return e
    except ValueError as e:  # JSONDecodeError, or a lone surrogate in a name
        return BadJSON(str(e))
    except RecursionError:
        return BadJSON("nested too deeply")
    if not isinstance(document, dict):
        return NotAnObject()
    return BadJSON("not a JSON object")  # not reached: the scan below agrees with decode


class NotAnObject(BadJSON):
    def __init__(self) -> None:
        super().__init__("not a JSON object")


def object_members(text: str) -> dict[str, tuple[Any, int, int]]:
    """
    The members of the JSON object `text`: name -> (value, start, end), where
    text[start:end] is the value's JSON text as sent. A repeated name keeps
    its last value, as json.loads does. Raises BadJSON (NotAnObject for valid
    JSON that is not an object).
    """
    _check_depth(text)
    members: dict[str, tuple[Any, int, int]] = {}
    try:
        i = _skip(text, 0).end()
        if text[i : i + 1] != "{":
            raise _why_invalid(text)
        i = _skip(text, i + 1).end()
        if text[i : i + 1] == "}":
            i += 1
        else:
            while True:
                if text[i : i + 1] != '"':
                    raise _why_invalid(text)
                name, i = scanstring(text, i + 1)
                i = _skip(text, i).end()
                if text[i : i + 1] != ":":
                    raise _why_invalid(text)
                start = _skip(text, i + 1).end()
                value, i = _scan_value(text, start)
                members[name] = (value, start, i)
                i = _skip(text, i).end()
                separator = text[i : i + 1]
                i += 1
                if separator == "}":
                    break
                if separator != ",":
                    raise _why_invalid(text)
                i = _skip(text, i).end()
        if _skip(text, i).end() != len(text):
            raise _why_invalid(text)
    except BadJSON:
        raise
    except RecursionError:
        raise BadJSON("nested too deeply") from None
    except ValueError:  # JSONDecodeError from the scanner
        raise _why_invalid(text) from None
    return members


def array_items(text: str, start: int) -> list[tuple[Any, int, int]]:
    """
    The items of the JSON array at text[start] (already validated, e.g. a member
    found by object_members): (value, start, end) for each, text[start:end] the
    item's JSON text as sent.
    """
    items: list[tuple[Any, int, int]] = []
    i = _skip(text, start + 1).end()
    if text[i : i + 1] == "]":
        return items
    while True:
        item_start = i
        value, i = _scan_value(text, item_start)
        items.append((value, item_start, i))
        i = _skip(text, i).end()
        if text[i : i + 1] == "]":
            return items
        i = _skip(text, i + 1).end()  # past the ","


def decode(text: str) -> Any:
    """json.loads with this module's rules (no NaN, no digit-limit ValueError, MAX_DEPTH)."""
    _check_depth(text)
    try:
        return _DECODER.decode(text)
    except BadJSON:
        raise
    except RecursionError:
        raise BadJSON("nested too deeply") from None
    except ValueError as e:
        raise BadJSON(str(e)) from None
