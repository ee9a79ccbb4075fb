"""
The published contract: dache/web/openapi.json (OpenAPI 3.1), served at
GET /openapi.json. Every route of the Klein app has its path there and every
path there is a route (tests/test_openapi.py); a route added in another
module adds its path object to the JSON file, or registers it with
add_paths() from that module.
"""

from __future__ import annotations

import json
from functools import cache
from importlib.resources import files
from typing import Any

import dache
from dache.rendering import render_json

_EXTRA_PATHS: dict[str, Any] = {}


def add_paths(paths: dict[str, Any]) -> None:
    """Document routes declared outside dache.web.api (call at import time)."""
    _EXTRA_PATHS.update(paths)
    openapi_document.cache_clear()


def document() -> dict[str, Any]:
    text = files("dache.web").joinpath("openapi.json").read_text(encoding="utf-8")
    spec = json.loads(text)
    spec["info"]["version"] = dache.__version__
    spec["paths"].update(_EXTRA_PATHS)
    return spec


@cache
def openapi_document() -> bytes:
    return render_json(document())
