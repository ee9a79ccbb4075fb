"""The HTTP API, driven in memory (no sockets) with a task.Clock for time."""

import json

import pytest
import pytest_twisted

from dache.store.cache import value_of
from dache.testing import MemoryNode, key_url
from tests.engines import FailingEngine, HeldEngine

NOW = 1_700_000_000


@pytest.fixture
def node():
    return MemoryNode()


async def call(node, method, key_or_path, body=None, raw=None, headers=None):
    """One request; returns (status, headers, parsed JSON body or None)."""
    url = key_or_path if key_or_path.startswith("http") else key_url(key_or_path)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    response = await node.http.request(method, url, data=data, headers=headers)
    content = await response.content()
    parsed = json.loads(content) if content else None
    return response.code, response.headers, parsed


async def set_(node, key, value, **fields):
    return (await call(node, "POST", key, {"value": value, **fields}))[0]


async def get(node, key):
    status, _, body = await call(node, "GET", key)
    return status, body


VALUES = [
    "plain string",
    "",
    0,
    -17,
    2**80,  # beyond 64 bits, exact
    3.141592653589793,
    1e-300,
    True,
    False,
    None,
    [],
    {},
    [1, "two", [3.5, None], {"four": False}],
    {"nested": {"deep": ["é", "日本", "🎉", "\u0000", 'quote"back\\slash']}},
]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("value", VALUES, ids=[repr(v)[:20] for v in VALUES])
async def test_any_json_value_round_trips_exactly(node, value):
    assert await set_(node, "k", value) == 204
    status, headers, body = await call(node, "GET", "k")
    assert status == 200
    assert headers.getRawHeaders("content-type") == ["application/json"]
    assert body == {"key": "k", "value": value}
    assert type(body["value"]) is type(value)


@pytest_twisted.ensureDeferred
async def test_put_means_the_same_as_post(node):
    status, _, body = await call(node, "PUT", "k", {"value": [1]})
    assert (status, body) == (204, None)
    assert await get(node, "k") == (200, {"key": "k", "value": [1]})


@pytest_twisted.ensureDeferred
async def test_overwrite_and_delete(node):
    await set_(node, "k", 1)
    await set_(node, "k", 2)
    assert await get(node, "k") == (200, {"key": "k", "value": 2})
    status, _, body = await call(node, "DELETE", "k")
    assert (status, body) == (204, None)
    status, body = await get(node, "k")
    assert status == 404 and "error" in body


@pytest_twisted.ensureDeferred
async def test_delete_of_a_missing_key_is_204(node):
    assert (await call(node, "DELETE", "never-set"))[0] == 204


@pytest_twisted.ensureDeferred
async def test_missing_key_is_a_json_404(node):
    status, headers, body = await call(node, "GET", "nope")
    assert status == 404
    assert headers.getRawHeaders("content-type") == ["application/json"]
    assert body == {"error": "key not found"}


KEYS = [
    "a/b",
    "a%2Fb",
    "100%",
    "with space",
    "a//b/",
    "/lead",
    "ключ",
    "🎉 emoji",
    "+plus+",
    "?q#h",
]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("key", KEYS)
async def test_keys_round_trip_exactly(node, key):
    assert await set_(node, key, key) == 204
    assert await get(node, key) == (200, {"key": key, "value": key})
    assert key in node.cache


@pytest_twisted.ensureDeferred
async def test_percent_2f_is_a_slash_in_the_key(node):
    await call(node, "POST", "http://dache.test/dache/a%2Fb", {"value": 1})
    assert await get(node, "a/b") == (200, {"key": "a/b", "value": 1})


@pytest_twisted.ensureDeferred
async def test_key_length_limit_counts_utf8_bytes():
    node = MemoryNode(max_key_bytes=8)
    assert await set_(node, "é" * 4, 1) == 204  # 8 bytes
    status, _, body = await call(node, "POST", "é" * 5, {"value": 1})  # 10 bytes
    assert status == 400 and "10 bytes" in body["error"] and "8" in body["error"]
    assert len(node.cache) == 1


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "path, message",
    [
        ("http://dache.test/dache/", "empty"),
        ("http://dache.test/dache/%FF%FE", "UTF-8"),
        ("http://dache.test/dache/a%00b", "NUL"),
    ],
)
async def test_bad_keys_are_400(node, path, message):
    for method in ("GET", "POST", "DELETE"):
        status, headers, body = await call(node, method, path, {"value": 1})
        assert status == 400, method
        assert message in body["error"]
    assert len(node.cache) == 0


BAD_BODIES = [
    (b'{"value": 1', "not valid JSON"),
    (b"", "not valid JSON"),
    (b'{"value": "\xff"}', "not valid UTF-8"),
    (b'[{"value": 1}]', "JSON object"),
    (b'"just a string"', "JSON object"),
    (b'{"expiry": 5}', '"value"'),
    (b'{"value": 1, "expires": 5}', '"expires"'),
    (b'{"value": 1, "ttl": 5, "expiry": 9999999999}', "not both"),
    (b'{"value": 1, "expiry": "tomorrow"}', '"expiry" must be a number'),
    (b'{"value": 1, "expiry": true}', '"expiry" must be a number'),
    (b'{"value": 1, "ttl": "5"}', '"ttl" must be a number'),
    (b'{"value": 1, "ttl": 0}', "positive"),
    (b'{"value": 1, "ttl": -3}', "positive"),
    (b'{"value": 1, "expiry": 1e20}', "9999"),
    (b'{"value": NaN}', "NaN"),
    (b'{"value": 1, "ttl": Infinity}', "Infinity"),
    (b'{"value": "\\ud800"}', "surrogate"),
    (b'{"value": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "JSON"),
]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("raw, message", BAD_BODIES, ids=[m for _, m in BAD_BODIES])
async def test_bad_bodies_are_400_and_change_nothing(node, raw, message):
    await set_(node, "k", "before")
    for method in ("POST", "PUT"):
        status, headers, body = await call(node, method, "k", raw=raw)
        assert status == 400
        assert headers.getRawHeaders("content-type") == ["application/json"]
        assert message in body["error"], body
    assert await get(node, "k") == (200, {"key": "k", "value": "before"})
    assert node.committer.changes == 1


@pytest_twisted.ensureDeferred
async def test_a_body_over_the_limit_is_413_and_changes_nothing():
    node = MemoryNode(max_value_bytes=100)
    status, _, body = await call(node, "POST", "k", {"value": "x" * 200})
    assert status == 413 and "100-byte" in body["error"]
    assert len(node.cache) == 0
    assert await set_(node, "k", "small") == 204  # still healthy


@pytest_twisted.ensureDeferred
async def test_wrong_method_is_405_with_allow(node):
    status, headers, body = await call(node, "TRACE", "k", {"value": 1})
    assert status == 405
    assert "TRACE" in body["error"]
    allow = headers.getRawHeaders("allow")[0]
    assert {m.strip() for m in allow.split(",")} >= {"GET", "POST", "PUT", "DELETE", "PATCH"}


@pytest_twisted.ensureDeferred
async def test_unknown_path_is_a_json_404(node):
    status, headers, body = await call(node, "GET", "http://dache.test/nope/x")
    assert status == 404
    assert headers.getRawHeaders("content-type") == ["application/json"]
    assert "error" in body


@pytest_twisted.ensureDeferred
async def test_health_passes(node):
    status, headers, body = await call(node, "GET", "http://dache.test/health")
    assert status == 200
    assert body["status"] == "pass"


# -- expiry


@pytest_twisted.ensureDeferred
async def test_expiry_is_returned_and_enforced_at_the_instant(node):
    await set_(node, "k", "v", expiry=NOW + 10.5)
    assert await get(node, "k") == (200, {"key": "k", "value": "v", "expiry": NOW + 10.5})
    node.clock.advance(10.4)
    assert (await get(node, "k"))[0] == 200
    node.clock.advance(0.1)
    assert (await get(node, "k"))[0] == 404  # at its expiry instant, never served


@pytest_twisted.ensureDeferred
async def test_integer_expiry_comes_back_as_given(node):
    await set_(node, "k", 1, expiry=NOW + 60)
    status, body = await get(node, "k")
    assert body["expiry"] == NOW + 60 and isinstance(body["expiry"], int)


@pytest_twisted.ensureDeferred
async def test_ttl_sets_expiry_from_now(node):
    await set_(node, "k", 1, ttl=30)
    assert (await get(node, "k"))[1]["expiry"] == NOW + 30
    node.clock.advance(29.999)
    assert (await get(node, "k"))[0] == 200
    node.clock.advance(0.001)
    assert (await get(node, "k"))[0] == 404


@pytest_twisted.ensureDeferred
async def test_null_expiry_means_no_expiry(node):
    await set_(node, "k", 1, expiry=None)
    status, body = await get(node, "k")
    assert body == {"key": "k", "value": 1}


@pytest_twisted.ensureDeferred
async def test_overwrite_without_expiry_clears_it(node):
    await set_(node, "k", 1, ttl=5)
    await set_(node, "k", 2)
    node.clock.advance(10)
    assert await get(node, "k") == (200, {"key": "k", "value": 2})


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("expiry", [NOW, NOW - 1, 0, -5])
async def test_expiry_at_or_before_now_is_a_durable_delete(expiry):
    engine = FailingEngine()
    node = MemoryNode(engine=engine)
    await set_(node, "k", "v")
    assert await set_(node, "k", "new", expiry=expiry) == 204
    assert (await get(node, "k"))[0] == 404
    assert [c.kind for c in engine.written] == ["set", "delete"]


# -- writes and the engine


@pytest_twisted.ensureDeferred
async def test_engine_down_writes_are_503_reads_still_served():
    engine = FailingEngine()
    node = MemoryNode(engine=engine)
    await set_(node, "k", "kept")
    engine.down = "could not reach the database"
    for method, body in (("POST", {"value": "lost"}), ("PUT", {"value": 1}), ("DELETE", None)):
        status, headers, answer = await call(node, method, "k", body)
        assert status == 503
        assert answer == {"error": "could not reach the database"}
        assert headers.getRawHeaders("retry-after") == ["1"]
    assert await get(node, "k") == (200, {"key": "k", "value": "kept"})
    engine.down = None
    assert await set_(node, "k", "back") == 204
    assert await get(node, "k") == (200, {"key": "k", "value": "back"})


def test_writes_time_out_with_503_instead_of_hanging():
    engine = HeldEngine()
    node = MemoryNode(engine=engine, write_timeout=2.0)
    d = node.http.post(key_url("k"), json={"value": 1})
    answers = []
    d.addCallback(lambda r: r.json().addCallback(lambda b: answers.append((r.code, b))))
    node.http.flush()
    assert answers == []
    node.clock.advance(2.0)
    node.http.flush()
    assert answers == [(503, {"error": "durability engine did not confirm the write within 2s"})]


def test_concurrent_writes_to_one_key_end_with_the_last_acknowledged():
    engine = HeldEngine()
    node = MemoryNode(engine=engine)
    acks = []
    sequence = [
        ("POST", 1),
        ("DELETE", None),
        ("POST", 2),
        ("PUT", 3),
        ("DELETE", None),
        ("POST", 4),
    ]
    for i, (method, value) in enumerate(sequence):
        data = None if value is None else json.dumps({"value": value}).encode()
        d = node.http.request(method, key_url("k"), data=data)
        d.addCallback(lambda r, i=i: acks.append((i, r.code)))
    node.http.flush()
    reached_engine = []
    while engine.writes:
        reached_engine += engine.release()
        node.http.flush()
    assert sorted(acks) == [(i, 204) for i in range(len(sequence))]
    # One order: the engine saw the changes as submitted, and revisions follow it.
    assert [c.value_json for c in reached_engine] == [b"1", None, b"2", b"3", None, b"4"]
    assert [c.revision for c in reached_engine] == list(range(1, 7))
    assert value_of(node.cache.get("k", NOW)) == 4
    assert node.committer.batches == 2  # the first alone, the rest grouped


def test_a_client_that_goes_away_does_not_stop_its_write():
    engine = HeldEngine()
    node = MemoryNode(engine=engine)
    d = node.http.post(key_url("k"), json={"value": "still written"})
    node.http.flush()
    d.cancel()
    d.addErrback(lambda failure: None)  # the client side sees its own cancellation
    engine.release()
    node.http.flush()
    assert value_of(node.cache.get("k", NOW)) == "still written"
