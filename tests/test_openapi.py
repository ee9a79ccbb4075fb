"""The published contract and the route table are the same set of routes."""

from __future__ import annotations

import json
import re

import pytest_twisted

from dache.testing import MemoryNode
from dache.web.api import DacheAPI, declare_all_routes
from dache.web.openapi import document


def routes() -> set[tuple[str, str]]:
    """(OpenAPI path, method) for every rule of the Klein app."""
    declare_all_routes()
    found = set()
    for rule in DacheAPI.app.url_map.iter_rules():
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        found |= {(path, method.lower()) for method in rule.methods}
    return found


def documented() -> set[tuple[str, str]]:
    return {(path, method) for path, item in document()["paths"].items() for method in item}


def test_every_route_has_a_schema_and_every_schema_a_route():
    assert routes() - documented() == set(), "routes without a schema"
    assert documented() - routes() == set(), "schemas without a route"


def test_every_operation_declares_its_error_answers():
    for path, item in document()["paths"].items():
        for method, operation in item.items():
            statuses = set(operation["responses"])
            assert {"400", "405", "500"} <= statuses, (path, method)
            assert operation["operationId"]


@pytest_twisted.ensureDeferred
async def test_the_document_is_served_at_openapi_json():
    node = MemoryNode()
    response = await node.http.get("http://dache/openapi.json")
    assert response.code == 200
    served = json.loads(await response.content())
    assert served["openapi"].startswith("3.1")
    assert served == document()
