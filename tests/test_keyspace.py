"""
The key space in memory (task.Clock): list by prefix, range delete, atomic
batches, PATCH touch/increment and conditional GET, against the committer and
the memory engine (or one that counts, holds or fails its writes).
"""

import json
import random
from urllib.parse import quote

import pytest
import pytest_twisted
from twisted.internet.defer import ensureDeferred

from dache.engines import Change
from dache.store.cache import value_json_of
from dache.store.follow import FollowedCache
from dache.testing import BASE, MemoryNode, key_url
from tests.engines import FailingEngine, HeldEngine


async def call(node, method, url, body=None, **headers):
    data = None if body is None else json.dumps(body).encode()
    headers = {name.replace("_", "-"): [v] for name, v in headers.items()}
    response = await node.http.request(method, url, data=data, headers=headers)
    content = await response.content()
    answer = json.loads(content) if content else None
    etag = response.headers.getRawHeaders("etag", [None])[0]
    return response.code, etag, answer


def listing(**parameters):
    query = "&".join(f"{name}={quote(str(value), safe='')}" for name, value in parameters.items())
    return f"{BASE}/dache?{query}"


async def fill(node, keys, value=1, **fields):
    for key in keys:
        status, _, _ = await call(node, "POST", key_url(key), {"value": value, **fields})
        assert status == 204


async def walk(node, page_size, between=None, **parameters):
    """Every key a paginated listing gives, page by page; `between` runs between pages."""
    seen, after, pages = [], None, 0
    while True:
        extra = {} if after is None else {"after": after}
        status, _, answer = await call(node, "GET", listing(limit=page_size, **parameters, **extra))
        assert status == 200, answer
        assert len(answer["entries"]) <= page_size
        seen.extend(entry["key"] for entry in answer["entries"])
        after, pages = answer["next"], pages + 1
        if after is None:
            return seen
        assert after == seen[-1]
        if between is not None:
            await between(pages)


# -- list


@pytest_twisted.ensureDeferred
async def test_a_listing_gives_entries_in_code_point_order_with_revisions():
    node = MemoryNode()
    keys = ["b", "a/2", "a/1", "a%2", "é", "a", "\U0001f600", "Z"]
    await fill(node, keys)
    status, _, answer = await call(node, "GET", f"{BASE}/dache")
    assert status == 200
    assert [e["key"] for e in answer["entries"]] == sorted(keys)  # Python's str order
    assert answer["next"] is None and answer["revision"] == len(keys)
    first = answer["entries"][0]
    assert first == {"key": "Z", "value": 1, "revision": keys.index("Z") + 1}


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("prefix", ["a/", "a%", "é", "\U0001f600", "a/%2F"])
async def test_prefixes_with_slashes_percent_signs_and_non_ascii(prefix):
    node = MemoryNode()
    keys = ["a", "a/", "a/x", "a/%2F", "a/%2Fy", "a%", "a%x", "a0", "é", "éé", "ê", "\U0001f600!"]
    await fill(node, keys)
    expected = sorted(k for k in keys if k.startswith(prefix))
    assert expected
    assert await walk(node, 2, prefix=prefix) == expected
    status, _, answer = await call(node, "GET", listing(prefix=prefix, count="true"))
    assert (status, answer) == (200, {"count": len(expected)})


@pytest_twisted.ensureDeferred
async def test_pagination_walks_every_key_once_while_keys_come_and_go():
    node = MemoryNode()
    rng = random.Random(12)
    stable = [f"p/{i:04d}" for i in range(0, 400, 2)]  # there throughout the walk
    await fill(node, stable)
    churn = [f"p/{i:04d}" for i in range(1, 400, 2)]

    async def between(page):
        for key in rng.sample(churn, 10):  # inserted (or rewritten) and deleted
            await call(node, "POST", key_url(key), {"value": page})
        for key in rng.sample(churn, 10):
            await call(node, "DELETE", key_url(key))
        await call(node, "POST", key_url(f"q/{page}"), {"value": 0})  # outside the prefix

    seen = await walk(node, 7, between, prefix="p/")
    assert seen == sorted(set(seen))  # in order, never twice
    assert set(stable) <= set(seen)  # every key present throughout, once
    assert all(key.startswith("p/") for key in seen)


@pytest_twisted.ensureDeferred
async def test_values_false_and_count_true():
    node = MemoryNode()
    await fill(node, ["k1", "k2", "other"])
    _, _, answer = await call(node, "GET", listing(prefix="k", values="false"))
    assert answer["entries"] == [{"key": "k1", "revision": 1}, {"key": "k2", "revision": 2}]
    _, _, answer = await call(node, "GET", listing(count="true"))
    assert answer == {"count": 3}


@pytest_twisted.ensureDeferred
async def test_expired_entries_are_never_listed_or_counted():
    node = MemoryNode()
    await fill(node, ["e1", "e2"], ttl=5)
    await fill(node, ["e3"])
    node.clock.advance(5)  # expired, but no sweep has run
    _, _, answer = await call(node, "GET", listing(prefix="e"))
    assert [e["key"] for e in answer["entries"]] == ["e3"]
    assert (await call(node, "GET", listing(prefix="e", count="true")))[2] == {"count": 1}


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "query, message",
    [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=ten", "limit"),
        ("limit=-1", "limit"),
        ("values=maybe", "values"),
        ("count=1", "count"),
        ("prefx=a", 'unknown parameter "prefx"'),
        ("prefix=a&prefix=b", "more than once"),
        ("prefix=%FF", "UTF-8"),
        ("prefix=a%00", "NUL"),
    ],
)
async def test_bad_list_parameters_are_400(query, message):
    node = MemoryNode()
    status, _, answer = await call(node, "GET", f"{BASE}/dache?{query}")
    assert status == 400 and message in answer["error"]


@pytest_twisted.ensureDeferred
async def test_the_index_follows_every_mutation_path():
    node = MemoryNode()
    await fill(node, ["a", "b"], ttl=1)
    index = node.cache.index()
    followed = FollowedCache(node.cache, node.clock)
    followed.apply(Change("set", "c", b"3", None, revision=10))  # another node's change
    followed.apply(Change("delete", "a", revision=11))
    node.clock.advance(2)
    node.cache.expire(node.clock.seconds())  # the sweeper
    assert list(index.starting_with("")) == ["c"] and len(index) == len(node.cache)


# -- range delete


@pytest_twisted.ensureDeferred
async def test_range_delete_is_one_engine_write_and_answers_the_count():
    engine = FailingEngine()
    node = MemoryNode(engine)
    await fill(node, ["u/1", "u/2", "u/3", "u0", "v"])
    writes = len(engine.written)
    status, _, answer = await call(node, "DELETE", listing(prefix="u/"))
    assert (status, answer) == (200, {"deleted": 3})
    assert [c.kind for c in engine.written[writes:]] == ["delete"] * 3
    _, _, answer = await call(node, "GET", f"{BASE}/dache")
    assert [e["key"] for e in answer["entries"]] == ["u0", "v"]
    assert (await call(node, "DELETE", listing(prefix="nothing")))[2] == {"deleted": 0}


@pytest_twisted.ensureDeferred
async def test_range_delete_needs_a_prefix_and_fails_whole_while_the_engine_is_down():
    engine = FailingEngine()
    node = MemoryNode(engine)
    await fill(node, ["u/1", "u/2"])
    for url in (f"{BASE}/dache", listing(prefix="")):
        status, _, answer = await call(node, "DELETE", url)
        assert status == 400 and "prefix" in answer["error"]
    engine.down = "disk on fire"
    status, _, answer = await call(node, "DELETE", listing(prefix="u/"))
    assert status == 503 and "disk on fire" in answer["error"]
    assert len(node.cache) == 2


# -- batches


def batch_url():
    return f"{BASE}/dache"


@pytest_twisted.ensureDeferred
async def test_a_batch_is_one_engine_write_with_consecutive_revisions_in_op_order():
    engine = FailingEngine()
    node = MemoryNode(engine)
    await fill(node, ["gone"])
    ops = [
        {"op": "set", "key": "n", "value": 1},
        {"op": "increment", "key": "n", "by": 41},
        {"op": "get", "key": "n"},
        {"op": "touch", "key": "n", "ttl": 60},
        {"op": "delete", "key": "gone"},
        {"op": "get", "key": "gone"},
        {"op": "set", "key": "n", "value": "last", "expiry": None},
    ]
    status, _, answer = await call(node, "POST", batch_url(), {"ops": ops})
    assert status == 200, answer
    assert answer["results"] == [
        2,
        3,
        {"key": "n", "value": 42, "revision": 3},
        4,
        5,
        None,
        6,
    ]
    assert len(engine.written) == 1 + 5  # the fill, then the batch's five writes at once
    assert node.committer.batches == 2
    # The touch's expiry went with the last set, which has none.
    assert (await call(node, "GET", key_url("n")))[2] == {"key": "n", "value": "last"}


@pytest_twisted.ensureDeferred
async def test_a_failed_precondition_fails_the_whole_batch_and_changes_nothing():
    engine = FailingEngine()
    node = MemoryNode(engine)
    await fill(node, ["a", "b"])
    ops = [
        {"op": "set", "key": "new", "value": 1},
        {"op": "set", "key": "a", "value": 2, "if_match": 1},  # holds
        {"op": "set", "key": "b", "value": 2, "if_match": 1},  # b is at revision 2
        {"op": "delete", "key": "a", "if_none_match": True},  # a exists
    ]
    writes = len(engine.written)
    status, _, answer = await call(node, "POST", batch_url(), {"ops": ops})
    assert status == 412 and answer["failed"] == [2, 3]
    assert "ops[2]" in answer["error"]
    assert len(engine.written) == writes  # nothing reached the engine
    assert (await call(node, "GET", key_url("new")))[0] == 404
    assert (await call(node, "GET", key_url("a")))[1] == '"1"'
    ops[2]["if_match"], ops[3] = 2, {"op": "set", "key": "c", "value": 0, "if_none_match": True}
    status, _, answer = await call(node, "POST", batch_url(), {"ops": ops})
    assert status == 200 and answer["results"] == [3, 4, 5, 6]


def held_calls(node, engine, first, rest):
    """Answers of `rest` (call arguments), all queued behind `first`'s write in flight."""
    answers = []

    def record(answer):
        answers.append(answer)

    ensureDeferred(call(node, *first))
    node.http.flush()
    assert len(engine.writes) == 1
    for arguments in rest:
        ensureDeferred(call(node, *arguments)).addCallback(record)
    node.http.flush()
    while engine.writes:
        engine.release()
        node.http.flush()
    assert len(answers) == len(rest)
    return answers


def test_preconditions_see_earlier_batches_in_commit_order():
    engine = HeldEngine()
    node = MemoryNode(engine)
    ops = [{"ops": [{"op": "set", "key": "k", "value": n, "if_match": 1}]} for n in (2, 3)]
    first = ("POST", key_url("k"), {"value": 1})
    answers = held_calls(node, engine, first, [("POST", batch_url(), body) for body in ops])
    assert sorted(status for status, _, _ in answers) == [200, 412]  # one wins


@pytest_twisted.ensureDeferred
async def test_a_multi_get_never_touches_the_engine_and_works_while_it_is_down():
    engine = FailingEngine()
    node = MemoryNode(engine)
    await fill(node, ["a", "b"])
    engine.down = "engine is down"
    writes = len(engine.written)
    ops = [{"op": "get", "key": key} for key in ("b", "missing", "a")]
    status, _, answer = await call(node, "POST", batch_url(), {"ops": ops})
    assert status == 200
    assert answer["results"] == [
        {"key": "b", "value": 1, "revision": 2},
        None,
        {"key": "a", "value": 1, "revision": 1},
    ]
    assert len(engine.written) == writes
    ops.append({"op": "set", "key": "c", "value": 1})
    status, _, answer = await call(node, "POST", batch_url(), {"ops": ops})
    assert status == 503 and (await call(node, "GET", key_url("c")))[0] == 404


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "body, message",
    [
        ([], "JSON object"),
        ({}, '"ops"'),
        ({"ops": []}, '"ops"'),
        ({"ops": [{"op": "get", "key": "k"}] * 1001}, "at most 1000"),
        ({"ops": [{"op": "get", "key": "k"}], "extra": 1}, 'unknown field "extra"'),
        ({"value": 1}, "key must not be empty"),
        ({"ops": [{"op": "get", "key": "k"}, "get k"]}, "ops[1]: an op must be an object"),
        ({"ops": [{"op": "drop", "key": "k"}]}, 'ops[0]: "op" must be one of'),
        ({"ops": [{"op": {"not": "a name"}, "key": "k"}]}, 'ops[0]: "op" must be one of'),
        ({"ops": [{"op": "get"}]}, 'ops[0]: "key" must be a string'),
        ({"ops": [{"op": "get", "key": ""}]}, "ops[0]: key must not be empty"),
        ({"ops": [{"op": "get", "key": "a\x00"}]}, "ops[0]: key must not contain a NUL"),
        ({"ops": [{"op": "get", "key": "k" * 1025}]}, "ops[0]: key is 1025 bytes"),
        ({"ops": [{"op": "set", "key": "k"}]}, 'ops[0]: a set needs a "value"'),
        ({"ops": [{"op": "set", "key": "k", "value": 1, "expires": 1}]}, 'unknown field "expires"'),
        ({"ops": [{"op": "set", "key": "k", "value": 1, "ttl": 1, "expiry": 1}]}, "not both"),
        ({"ops": [{"op": "set", "key": "k", "value": 1, "ttl": -1}]}, '"ttl" must be a positive'),
        ({"ops": [{"op": "get", "key": "k", "value": 1}]}, 'ops[0]: unknown field "value"'),
        ({"ops": [{"op": "touch", "key": "k"}]}, 'ops[0]: a touch needs "expiry" or "ttl"'),
        ({"ops": [{"op": "increment", "key": "k", "by": "1"}]}, "by"),
        ({"ops": [{"op": "increment", "key": "k", "by": True}]}, "by"),
        ({"ops": [{"op": "delete", "key": "k", "if_match": "1"}]}, '"if_match"'),
        ({"ops": [{"op": "delete", "key": "k", "if_none_match": 1}]}, '"if_none_match"'),
    ],
)
async def test_a_bad_batch_is_400_naming_the_op_and_changes_nothing(body, message):
    node = MemoryNode()
    ops = [{"op": "set", "key": "first", "value": 1}]
    if "ops[" in message:  # after a good op: the index named is the bad op's
        body = {**body, "ops": ops + body["ops"]}
        message = message.replace("ops[0]", "ops[1]").replace("ops[1]: an", "ops[2]: an")
    status, _, answer = await call(node, "POST", batch_url(), body)
    assert status == 400, answer
    assert message in answer["error"]
    assert len(node.cache) == 0 and node.committer.changes == 0


# -- PATCH


@pytest_twisted.ensureDeferred
async def test_patch_touches_only_the_expiry():
    node = MemoryNode()
    now = node.clock.seconds()
    await fill(node, ["k"], value={"big": [1, 2]})
    status, etag, answer = await call(node, "PATCH", key_url("k"), {"ttl": 30})
    assert (status, etag, answer) == (200, '"2"', {"key": "k", "value": {"big": [1, 2]},
                                                   "expiry": now + 30})  # fmt: skip
    status, _, answer = await call(node, "PATCH", key_url("k"), {"expiry": None})
    assert status == 200 and "expiry" not in answer
    status, _, answer = await call(node, "PATCH", key_url("k"), {"expiry": now + 5})
    assert answer["expiry"] == now + 5
    node.clock.advance(5)
    assert (await call(node, "GET", key_url("k")))[0] == 404
    status, _, answer = await call(node, "PATCH", key_url("k"), {"ttl": 30})
    assert status == 404 and answer == {"error": "key not found"}
    assert node.cache.get("k", node.clock.seconds()) is None  # a touch never creates


@pytest_twisted.ensureDeferred
async def test_patch_with_an_expiry_in_the_past_deletes_a_key_but_not_an_absent_one():
    node = MemoryNode()
    past = node.clock.seconds() - 1
    await fill(node, ["k"])
    assert (await call(node, "PATCH", key_url("k"), {"expiry": past}))[0] == 204
    assert (await call(node, "GET", key_url("k")))[0] == 404
    revision = node.committer.revision
    # An absent key incremented and expired at once: nothing was there, nothing is.
    status, _, answer = await call(node, "PATCH", key_url("k"), {"increment": 1, "expiry": past})
    assert (status, answer) == (404, {"error": "key not found"})
    assert node.committer.revision == revision  # nothing was written


@pytest_twisted.ensureDeferred
async def test_patch_increments_exactly_and_an_absent_key_starts_at_zero():
    node = MemoryNode()
    big = 2**70
    status, etag, answer = await call(node, "PATCH", key_url("n"), {"increment": big})
    assert (status, etag, answer) == (200, '"1"', {"key": "n", "value": big})
    assert (await call(node, "PATCH", key_url("n"), {"increment": 1}))[2]["value"] == big + 1
    assert (await call(node, "PATCH", key_url("n"), {"increment": -big}))[2]["value"] == 1
    assert (await call(node, "PATCH", key_url("n"), {"increment": 0.5}))[2]["value"] == 1.5
    status, _, answer = await call(node, "PATCH", key_url("c"), {"increment": 1, "ttl": 10})
    assert answer == {"key": "c", "value": 1, "expiry": node.clock.seconds() + 10}
    _, _, body = await call(node, "GET", key_url("n"))
    assert body == {"key": "n", "value": 1.5}


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("value", ["7", True, None, [1], {"n": 1}])
async def test_increment_of_a_non_number_is_409_and_changes_nothing(value):
    node = MemoryNode()
    await fill(node, ["k"], value=value)
    status, _, answer = await call(node, "PATCH", key_url("k"), {"increment": 1})
    assert status == 409 and "not a number" in answer["error"]
    assert (await call(node, "GET", key_url("k")))[1:] == ('"1"', {"key": "k", "value": value})


@pytest_twisted.ensureDeferred
async def test_patch_honours_if_match_and_if_none_match():
    node = MemoryNode()
    await fill(node, ["k"], value=1)
    status, current, _ = await call(node, "PATCH", key_url("k"), {"increment": 1}, if_match='"9"')
    assert (status, current) == (412, '"1"')
    status, etag, _ = await call(node, "PATCH", key_url("k"), {"increment": 1}, if_match='"1"')
    assert (status, etag) == (200, '"2"')
    status, _, _ = await call(node, "PATCH", key_url("new"), {"increment": 1}, if_none_match="*")
    assert status == 200
    status, _, _ = await call(node, "PATCH", key_url("new"), {"increment": 1}, if_none_match="*")
    assert status == 412


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "body, message",
    [
        ({}, "nothing to change"),
        ({"value": 1}, 'unknown field "value"'),
        ({"increment": "1"}, '"increment" must be a number'),
        ({"increment": 1, "ttl": 0}, '"ttl" must be a positive'),
        ({"ttl": 1, "expiry": 2}, "not both"),
        ([1], "JSON object"),
    ],
)
async def test_a_bad_patch_is_400(body, message):
    node = MemoryNode()
    await fill(node, ["k"])
    status, _, answer = await call(node, "PATCH", key_url("k"), body)
    assert status == 400 and message in answer["error"]
    assert node.committer.changes == 1


def test_increments_queued_in_one_batch_all_count():
    engine = HeldEngine()
    node = MemoryNode(engine)
    patch = ("PATCH", key_url("n"), {"increment": 1})
    answers = held_calls(node, engine, patch, [patch] * 20)
    assert sorted(answer["value"] for _, _, answer in answers) == list(range(2, 22))
    assert len(engine.writes) == 0 and node.committer.batches == 2


# -- conditional GET


@pytest_twisted.ensureDeferred
async def test_if_none_match_answers_304_with_the_etag_while_unchanged():
    node = MemoryNode()
    await fill(node, ["k"])
    response = await node.http.get(key_url("k"), headers={"If-None-Match": ['"1"']})
    assert response.code == 304 and await response.content() == b""
    assert response.headers.getRawHeaders("etag") == ['"1"']
    assert (await call(node, "GET", key_url("k"), if_none_match='"7", "1"'))[0] == 304
    assert (await call(node, "GET", key_url("k"), if_none_match="*"))[0] == 304
    await fill(node, ["k"], value=2)
    status, etag, body = await call(node, "GET", key_url("k"), if_none_match='"1"')
    assert (status, etag, body) == (200, '"2"', {"key": "k", "value": 2})
    assert (await call(node, "GET", key_url("k"), if_none_match="1"))[0] == 400


@pytest_twisted.ensureDeferred
async def test_a_batch_stores_each_value_as_sent_like_a_single_post():
    node = MemoryNode()
    digits = "7" * 5000  # past int()'s digit limit: still a number, kept exact
    texts = ["1e-400", "-0", "1.10", digits, '{"a" : [1, 2.50]}', '"\\u00e9"']
    ops = ", ".join(
        f'{{"op": "set", "key": "k{i}", "value": {text}}}' for i, text in enumerate(texts)
    )
    response = await node.http.request("POST", batch_url(), data=f'{{"ops": [{ops}]}}'.encode())
    assert response.code == 200, await response.content()
    for i, text in enumerate(texts):
        assert value_json_of(node.cache.get(f"k{i}", node.clock.seconds())) == text.encode()
    bad = b'{"ops": [{"op": "increment", "key": "n", "by": ' + digits.encode() + b"}]}"
    response = await node.http.request("POST", batch_url(), data=bad)
    assert response.code == 400  # a by past the digit limit: refused, never a 500


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "key, message",
    [
        ("a\x00", "ops[1]: key must not contain a NUL"),
        ("k" * 1025, "ops[1]: key is 1025 bytes"),
        ("é" * 513, "ops[1]: key is 1026 bytes"),
        ("", "ops[1]: key must not be empty"),
        (7, 'ops[1]: "key" must be a string'),
    ],
)
async def test_a_multi_get_checks_every_key_like_a_single_get(key, message):
    node = MemoryNode()
    await fill(node, ["a", "é"])
    body = {"ops": [{"op": "get", "key": "a"}, {"op": "get", "key": key}]}
    status, _, answer = await call(node, "POST", batch_url(), body)
    assert (status, message in answer["error"]) == (400, True), answer
    good = {
        "ops": [{"op": "get", "key": "é"}, {"op": "get", "key": "a"}, {"op": "get", "key": "b"}]
    }
    status, _, answer = await call(node, "POST", batch_url(), good)
    assert status == 200
    assert [r and r["key"] for r in answer["results"]] == ["é", "a", None]
