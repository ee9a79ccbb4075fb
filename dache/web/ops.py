"""
Parsing what the key-space routes are asked for: list parameters, PATCH
bodies and the ops of an atomic batch. Each op is validated like its
single-key twin; an error names the op's index (`ops[3]: ...`). Everything
here raises APIError (400) and changes nothing.
"""

from __future__ import annotations

from typing import Any

from twisted.web.iweb import IRequest

from dache.engines import ANY, GET, UPDATE, Change
from dache.engines.decide import KEEP, Update
from dache.rendering import render_json
from dache.web.answer import APIError
from dache.web.api import MAX_EXPIRY, MAX_TTL, _number, body_members, body_text
from dache.web.json_text import BadJSON, array_items, decode, object_members

MAX_OPS = 1000
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
LIST_PARAMETERS = ("prefix", "limit", "after", "values", "count")
PATCH_FIELDS = ("increment", "expiry", "ttl")
OP_FIELDS = {
    "get": ("op", "key"),
    "set": ("op", "key", "value", "expiry", "ttl", "if_match", "if_none_match"),
    "delete": ("op", "key", "if_match", "if_none_match"),
    "touch": ("op", "key", "expiry", "ttl", "if_match", "if_none_match"),
    "increment": ("op", "key", "by", "expiry", "ttl", "if_match", "if_none_match"),
}


class ListQuery:
    """GET /dache's parameters."""

    def __init__(self, prefix: str, limit: int, after: str | None, values: bool, count: bool):
        self.prefix = prefix
        self.limit = limit
        self.after = after
        self.values = values
        self.count = count


def _parameters(request: IRequest, allowed: tuple[str, ...]) -> dict[str, str]:
    """The query string's parameters, each once, UTF-8 text; unknown ones refused."""
    found: dict[str, str] = {}
    for raw_name, raw_values in (request.args or {}).items():
        name = raw_name.decode("utf-8", "replace")
        if name not in allowed:
            raise APIError(
                400, f'unknown parameter "{name}"; accepted parameters: ' + ", ".join(allowed)
            )
        if len(raw_values) != 1:
            raise APIError(400, f'parameter "{name}" given more than once')
        try:
            found[name] = raw_values[0].decode("utf-8")
        except UnicodeDecodeError:
            raise APIError(400, f'parameter "{name}" is not valid UTF-8')
        if "\x00" in found[name]:
            raise APIError(400, f'parameter "{name}" must not contain a NUL character')
    return found


def _flag(parameters: dict[str, str], name: str, default: bool) -> bool:
    text = parameters.get(name)
    if text is None:
        return default
    if text not in ("true", "false"):
        raise APIError(400, f'parameter "{name}" must be true or false')
    return text == "true"


def parse_list(request: IRequest) -> ListQuery:
    parameters = _parameters(request, LIST_PARAMETERS)
    limit = DEFAULT_LIMIT
    if "limit" in parameters:
        text = parameters["limit"]
        # (the length first: int() of over 4,300 digits raises ValueError)
        if (
            not text.isascii()
            or not text.isdigit()
            or len(text) > 9
            or not 1 <= int(text) <= MAX_LIMIT
        ):
            raise APIError(400, f'parameter "limit" must be a whole number from 1 to {MAX_LIMIT}')
        limit = int(text)
    return ListQuery(
        prefix=parameters.get("prefix", ""),
        limit=limit,
        after=parameters.get("after") or None,
        values=_flag(parameters, "values", True),
        count=_flag(parameters, "count", False),
    )


def parse_prefix_delete(request: IRequest) -> str:
    prefix = _parameters(request, ("prefix",)).get("prefix")
    if not prefix:
        raise APIError(400, 'DELETE /dache needs a non-empty "prefix" parameter')
    return prefix


def parse_document(body: bytes, shape: str) -> dict[str, Any]:
    """A body that must be a JSON object (shape: how it should look, for the error)."""
    try:
        document = decode(body_text(body))
    except BadJSON as e:
        raise APIError(400, f"body is not valid JSON: {e}")
    if not isinstance(document, dict):
        raise APIError(400, f"body must be a JSON object like {shape}")
    return document


def _known(document: dict[str, Any], fields: tuple[str, ...], where: str) -> None:
    for name in document:
        if name not in fields:
            raise APIError(
                400, f'{where}unknown field "{name}"; accepted fields: ' + ", ".join(fields)
            )


def parse_expiry(document: dict[str, Any], now: float, where: str = "") -> float | str | None:
    """The expiry asked for by "expiry" (an instant or null) or "ttl"; KEEP when neither."""
    if "expiry" in document and "ttl" in document:
        raise APIError(400, f'{where}give either "expiry" or "ttl", not both')
    if "ttl" in document:
        ttl = _number(f"{where}ttl", document["ttl"])
        if ttl <= 0:
            raise APIError(400, f'{where}"ttl" must be a positive number of seconds')
        if ttl > MAX_TTL:
            raise APIError(400, f'{where}"ttl" must be at most {MAX_TTL} seconds')
        if now + ttl > MAX_EXPIRY:
            raise APIError(400, f'{where}"ttl" reaches past 9999-12-31T23:59:59Z')
        return now + ttl
    if "expiry" in document:
        if document["expiry"] is None:
            return None
        expiry = _number(f"{where}expiry", document["expiry"])
        if expiry > MAX_EXPIRY:
            raise APIError(400, f'{where}"expiry" must be at or before 9999-12-31T23:59:59Z')
        return expiry
    return KEEP


def _increment(value: Any, field: str) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise APIError(400, f'"{field}" must be a number')
    return _number(field, value) if isinstance(value, float) else value


def parse_patch(body: bytes, key: str, now: float) -> Change:
    """PATCH /dache/<key>: a touch (expiry/ttl), an increment, or both, as one UPDATE."""
    document = parse_document(body, '{"ttl": 60} or {"increment": 1}')
    _known(document, PATCH_FIELDS, "")
    if not document:
        raise APIError(400, 'nothing to change: give "increment", "expiry" or "ttl"')
    increment = None
    if "increment" in document:
        increment = _increment(document["increment"], "increment")
    change = Change(UPDATE, key)
    change.update = Update(increment, parse_expiry(document, now))
    return change


def check_key(key: Any, max_key_bytes: int, where: str) -> str:
    """A key given in a body: the same rules as one in a path."""
    if not isinstance(key, str):
        raise APIError(400, f'{where}"key" must be a string')
    if not key:
        raise APIError(400, f"{where}key must not be empty")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise APIError(400, f"{where}key is not valid UTF-8")
    if size > max_key_bytes:
        raise APIError(400, f"{where}key is {size} bytes; the limit is {max_key_bytes}")
    if "\x00" in key:
        raise APIError(400, f"{where}key must not contain a NUL character")
    return key


def _preconditions(op: dict[str, Any], change: Change, where: str) -> None:
    if "if_match" in op:
        tag = op["if_match"]
        if tag == ANY:
            change.if_match = ANY
        elif isinstance(tag, int) and not isinstance(tag, bool) and tag >= 0:
            change.if_match = (tag,)
        else:
            raise APIError(400, f'{where}"if_match" must be a revision (a number) or "*"')
    if "if_none_match" in op:
        if op["if_none_match"] is not True:
            raise APIError(400, f'{where}"if_none_match" must be true (the key must be absent)')
        change.if_none_match = ANY


def parse_op(
    op: Any, index: int, max_key_bytes: int, now: float, value_json: bytes | None = None
) -> Change:
    """One op of a batch; value_json: a set's value as sent (else it is rendered)."""
    where = f"ops[{index}]: "
    if not isinstance(op, dict):
        raise APIError(400, f'{where}an op must be an object like {{"op": "get", "key": "k"}}')
    kind = op.get("op")
    if not isinstance(kind, str) or kind not in OP_FIELDS:
        raise APIError(400, f'{where}"op" must be one of ' + ", ".join(OP_FIELDS))
    _known(op, OP_FIELDS[kind], where)
    key = check_key(op.get("key"), max_key_bytes, where)
    if kind == "get":
        return Change(GET, key)
    if kind == "delete":
        change = Change.delete(key)
    elif kind == "set":
        if "value" not in op:
            raise APIError(400, f'{where}a set needs a "value"')
        if value_json is None or b"\\u" in value_json:
            try:  # (a lone surrogate escape is valid JSON but not Unicode)
                rendered = render_json(op["value"])
            except (ValueError, RecursionError) as e:
                raise APIError(400, f'{where}"value" {e}')
            value_json = rendered if value_json is None else value_json
        expiry = parse_expiry(op, now, where)
        expiry = None if expiry == KEEP else expiry
        if expiry is not None and expiry <= now:  # as POST: an expiry in the past deletes
            change = Change.delete(key)
        else:
            change = Change.set(key, value_json, expiry)  # type: ignore[arg-type]
    else:
        expiry = parse_expiry(op, now, where)
        if kind == "touch" and expiry == KEEP:
            raise APIError(400, f'{where}a touch needs "expiry" or "ttl"')
        increment = None
        if kind == "increment":
            increment = _increment(op.get("by", 1), f"{where}by")
        change = Change(UPDATE, key)
        change.update = Update(increment, expiry)
    _preconditions(op, change, where)
    return change


def parse_batch(body: bytes, max_key_bytes: int, now: float) -> list[Change]:
    """POST /dache {"ops": [...]}: every op as a Change (see batch_ops, batch_changes)."""
    return batch_changes(*batch_ops(body), max_key_bytes, now)


def batch_ops(body: bytes) -> tuple[str, list[Any], int]:
    """A batch body's text, its ops (decoded) and where the ops array starts in the text."""
    text, members = body_members(body, '{"ops": [{"op": "get", "key": "k"}]}')
    if "value" in members:  # a set sent without its key
        raise APIError(400, "key must not be empty: set a key at /dache/<key>")
    _known(members, ("ops",), "")
    ops, start, _ = members.get("ops", (None, 0, 0))
    if not isinstance(ops, list) or not ops:
        raise APIError(400, 'body must have "ops": a non-empty list of ops')
    if len(ops) > MAX_OPS:
        raise APIError(400, f"a batch has at most {MAX_OPS} ops; this one has {len(ops)}")
    return text, ops, start


def multi_get_keys(ops: list[Any], max_key_bytes: int) -> list[str] | None:
    """
    The keys of a batch of plain gets ({"op": "get", "key": k} each, every key
    valid), or None: then batch_changes parses it op by op (and names a bad one).
    The fast path of a multi-get, which never needs Change objects.
    """
    keys = []
    for op in ops:
        if op.__class__ is not dict or len(op) != 2 or op.get("op") != "get":
            return None
        key = op.get("key")
        # ASCII: its length is its size in bytes; anything else check_key decides.
        if key.__class__ is not str or not key.isascii() or not 0 < len(key) <= max_key_bytes:
            return None
        if "\x00" in key:
            return None
        keys.append(key)
    return keys


def batch_changes(
    text: str, ops: list[Any], start: int, max_key_bytes: int, now: float
) -> list[Change]:
    """
    Every op as a Change, validated like its single-key twin. A set's value is
    kept as the JSON text the client sent, as for POST /dache/<key> (see
    dache.web.json_text).
    """
    if not any(op.__class__ is dict and "value" in op for op in ops):  # e.g. a multi-get
        return [parse_op(op, i, max_key_bytes, now) for i, op in enumerate(ops)]
    changes = []  # a second scan, for the text of each value as sent
    for i, (op, op_start, op_end) in enumerate(array_items(text, start)):
        value_json = None
        if isinstance(op, dict) and "value" in op:
            _, value_start, value_end = object_members(text[op_start:op_end])["value"]
            value_json = text[op_start + value_start : op_start + value_end].encode("utf-8")
        changes.append(parse_op(op, i, max_key_bytes, now, value_json))
    return changes
