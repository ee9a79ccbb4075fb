"""Conditional writes: ETag on reads, If-Match / If-None-Match on writes (every engine)."""

import json

import pytest_twisted

from dache.store.cache import revision_of
from dache.testing import MemoryNode, key_url
from tests.engines import HeldEngine


async def request(node, method, key, value=None, **headers):
    data = None if value is None else json.dumps({"value": value}).encode()
    headers = {name.replace("_", "-"): [v] for name, v in headers.items()}
    response = await node.http.request(method, key_url(key), data=data, headers=headers)
    body = await response.content()
    etag = response.headers.getRawHeaders("etag", [None])[0]
    return response.code, etag, json.loads(body) if body else None


@pytest_twisted.ensureDeferred
async def test_reads_and_writes_carry_the_revision_as_an_etag():
    node = MemoryNode()
    status, first, _ = await request(node, "POST", "k", 1)
    assert (status, first) == (204, '"1"')
    status, etag, body = await request(node, "GET", "k")
    assert (status, etag) == (200, '"1"')
    _, second, _ = await request(node, "PUT", "k", 2)
    assert second == '"2"'
    assert (await request(node, "GET", "k"))[1] == '"2"'


@pytest_twisted.ensureDeferred
async def test_if_match_succeeds_only_on_the_current_etag():
    node = MemoryNode()
    await request(node, "POST", "k", "v1")
    _, etag, _ = await request(node, "GET", "k")
    assert (await request(node, "POST", "k", "v2", if_match=etag))[0] == 204
    status, current, body = await request(node, "POST", "k", "v3", if_match=etag)  # stale
    assert status == 412
    assert current == '"2"' and "precondition failed" in body["error"]
    assert (await request(node, "GET", "k"))[2]["value"] == "v2"
    assert (await request(node, "POST", "k", "v3", if_match=f'"9", {current}'))[0] == 204


@pytest_twisted.ensureDeferred
async def test_if_none_match_star_creates_only_when_absent():
    node = MemoryNode()
    assert (await request(node, "POST", "k", "first", if_none_match="*"))[0] == 204
    status, _, body = await request(node, "POST", "k", "second", if_none_match="*")
    assert status == 412
    assert (await request(node, "GET", "k"))[2]["value"] == "first"


@pytest_twisted.ensureDeferred
async def test_if_match_star_needs_the_key_to_exist():
    node = MemoryNode()
    status, _, body = await request(node, "PUT", "k", 1, if_match="*")
    assert status == 412 and "absent" in body["error"]
    assert (await request(node, "GET", "k"))[0] == 404


@pytest_twisted.ensureDeferred
async def test_conditional_delete():
    node = MemoryNode()
    await request(node, "POST", "k", 1)
    assert (await request(node, "DELETE", "k", if_match='"7"'))[0] == 412
    assert (await request(node, "GET", "k"))[0] == 200
    assert (await request(node, "DELETE", "k", if_match='"1"'))[0] == 204
    assert (await request(node, "GET", "k"))[0] == 404


@pytest_twisted.ensureDeferred
async def test_an_expired_entry_is_absent_for_preconditions():
    node = MemoryNode()
    data = json.dumps({"value": 1, "ttl": 5}).encode()
    await node.http.post(key_url("k"), data=data)
    node.clock.advance(5)
    assert (await request(node, "POST", "k", 2, if_match='"1"'))[0] == 412
    assert (await request(node, "POST", "k", 2, if_none_match="*"))[0] == 204


@pytest_twisted.ensureDeferred
async def test_a_malformed_etag_header_is_400():
    node = MemoryNode()
    status, _, body = await request(node, "POST", "k", 1, if_match="12")
    assert status == 400 and "If-Match" in body["error"]
    assert (await request(node, "GET", "k"))[0] == 404


def test_racing_updates_on_one_etag_have_exactly_one_winner():
    engine = HeldEngine()
    node = MemoryNode(engine=engine)
    node.http.post(key_url("k"), json={"value": 0})
    node.http.flush()
    engine.release()
    node.http.flush()
    codes = []
    for i in range(20):  # all queued behind one write, then decided in one batch
        d = node.http.put(key_url("k"), json={"value": i}, headers={"If-Match": ['"1"']})
        d.addCallback(lambda response: codes.append(response.code))
    node.http.flush()
    while engine.writes:
        engine.release()
        node.http.flush()
    assert sorted(codes) == [204] + [412] * 19
    assert revision_of(node.cache.get("k", node.clock.seconds())) == 2
