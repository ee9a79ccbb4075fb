"""Compact JSON as UTF-8 bytes: the one renderer every layer uses (a leaf module)."""

from __future__ import annotations

import json

_DUMPS = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
# What _DUMPS does for a str, without its Python layer (a million keys at load).
_encode_str = json.encoder.encode_basestring


def render_json(value: object) -> bytes:
    """Compact JSON as UTF-8; ValueError for NaN/Infinity or lone surrogates."""
    try:
        return _DUMPS(value).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains a lone UTF-16 surrogate, which is not valid Unicode")


def render_key(key: str) -> bytes:
    """A key as a JSON string, UTF-8: render_json(key), faster."""
    try:
        return _encode_str(key).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("contains a lone UTF-16 surrogate, which is not valid Unicode")
