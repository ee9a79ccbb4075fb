"""
Access control: bearer tokens in front of every route (dache/auth.py).

In memory through the real resource (MemoryNode + StubTreq), plus one
`twistd -n dache` subprocess for what only a real process shows: the token
file is read at start-up and no token ever reaches the log.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted

from dache.config import ConfigError, default_config, resolve
from dache.testing import MemoryNode
from dache.web.auth import Access, read_token_files

WRITE = "write-token-0123456789"
READ = "read-token-9876543210"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def node() -> MemoryNode:
    return MemoryNode(access=Access(WRITE, READ))


async def call(node, method, url, headers=None, **kwargs):
    response = await getattr(node.http, method)(url, headers=headers, **kwargs)
    body = await response.content()
    return response, body


async def stored(node, key):
    """What the key holds, read with the write token (None: not found)."""
    response, body = await call(node, "get", node.url(key), bearer(WRITE))
    return json.loads(body)["value"] if response.code == 200 else None


@pytest_twisted.ensureDeferred
async def test_without_a_token_a_key_request_is_refused_with_401_and_a_bearer_challenge(node):
    for method, kwargs in [("get", {}), ("post", {"json": {"value": 1}}), ("delete", {})]:
        response, body = await call(node, method, node.url("k"), **kwargs)
        assert response.code == 401
        assert response.headers.getRawHeaders("www-authenticate") == ['Bearer realm="dache"']
        assert response.headers.getRawHeaders("content-type") == ["application/json"]
        assert "Authorization: Bearer" in json.loads(body)["error"]
    assert await stored(node, "k") is None  # the refused POST wrote nothing


@pytest_twisted.ensureDeferred
async def test_a_wrong_token_is_refused_with_401_invalid_token(node):
    for headers in [
        bearer("nope"),
        bearer(WRITE + "x"),
        bearer(WRITE[:-1]),
        {"Authorization": f"Basic {WRITE}"},  # right secret, wrong scheme
        {"Authorization": "Bearer"},
    ]:
        response, body = await call(node, "post", node.url("k"), headers, json={"value": 1})
        assert response.code == 401, headers
        assert "error" in json.loads(body)
        assert WRITE not in body.decode()  # never echoed
    response, _ = await call(node, "get", node.url("k"), bearer("nope"))
    assert response.headers.getRawHeaders("www-authenticate") == [
        'Bearer realm="dache", error="invalid_token"'
    ]
    assert await stored(node, "k") is None


@pytest_twisted.ensureDeferred
async def test_the_write_token_reads_writes_and_deletes(node):
    response, _ = await call(node, "post", node.url("k"), bearer(WRITE), json={"value": [1]})
    assert response.code == 204
    assert await stored(node, "k") == [1]
    # The scheme is case-insensitive (RFC 7235).
    response, _ = await call(node, "get", node.url("k"), {"Authorization": f"bearer {WRITE}"})
    assert response.code == 200
    response, _ = await call(node, "delete", node.url("k"), bearer(WRITE))
    assert response.code == 204
    assert await stored(node, "k") is None


@pytest_twisted.ensureDeferred
async def test_the_read_token_reads_but_its_writes_get_403_and_change_nothing(node):
    await call(node, "post", node.url("k"), bearer(WRITE), json={"value": "kept"})
    response, body = await call(node, "get", node.url("k"), bearer(READ))
    assert response.code == 200
    assert json.loads(body)["value"] == "kept"
    response, _ = await call(node, "head", node.url("k"), bearer(READ))
    assert response.code == 200
    for method, kwargs in [("post", {"json": {"value": "x"}}), ("put", {"json": {"value": "x"}})]:
        response, body = await call(node, method, node.url("k"), bearer(READ), **kwargs)
        assert response.code == 403
        assert response.headers.getRawHeaders("www-authenticate") == [
            'Bearer realm="dache", error="insufficient_scope"'
        ]
        assert "only read" in json.loads(body)["error"]
    response, _ = await call(node, "delete", node.url("k"), bearer(READ))
    assert response.code == 403
    assert await stored(node, "k") == "kept"


@pytest_twisted.ensureDeferred
async def test_paths_outside_dache_need_a_token_too(node):
    # /metrics, unknown routes and the Klein-handled /dache error routes alike.
    for path in ["/metrics", "/nowhere", "/dache", "/dache/"]:
        response, _ = await call(node, "get", "http://dache.test" + path)
        assert response.code == 401, path
        response, _ = await call(node, "get", "http://dache.test" + path, bearer(READ))
        assert response.code != 401, path


@pytest_twisted.ensureDeferred
async def test_health_is_open_but_a_caller_without_a_token_sees_only_the_status(node):
    for path in ["/health", "/health/ready", "/health/live"]:
        for headers in [None, bearer("wrong")]:
            response, body = await call(node, "get", "http://dache.test" + path, headers)
            assert response.code == 200
            assert json.loads(body) == {"status": "pass"}
    # The detail (engine, entries, uptime, errors) is for token holders.
    response, body = await call(node, "get", "http://dache.test/health", bearer(READ))
    detailed = json.loads(body)
    assert detailed["status"] == "pass"
    assert detailed["checks"]["engine:responseTime"][0]["componentId"] == "memory"
    assert detailed["checks"]["cache:entries"][0]["observedValue"] == 0


@pytest_twisted.ensureDeferred
async def test_with_access_control_off_everything_is_open():
    node = MemoryNode()
    response, _ = await call(node, "post", node.url("k"), json={"value": 1})
    assert response.code == 204
    response, body = await call(node, "get", node.url("k"))
    assert json.loads(body)["value"] == 1


# -- configuration


def test_tokens_come_from_their_files_without_surrounding_whitespace(tmp_path):
    (tmp_path / "write").write_text(WRITE + "\n")
    (tmp_path / "read").write_text(f"  {READ}\r\n")
    config = read_token_files(
        resolve(
            {},
            {
                "AUTH_TOKEN_FILE": str(tmp_path / "write"),
                "AUTH_READ_TOKEN_FILE": str(tmp_path / "read"),
            },
        )
    )
    assert (config.auth_token, config.auth_read_token) == (WRITE, READ)
    assert WRITE not in repr(config) and READ not in repr(config)


@pytest.mark.parametrize(
    "environ, files, message",
    [
        ({"AUTH_TOKEN": ""}, {}, "AUTH_TOKEN must not be empty"),
        ({"AUTH_TOKEN": "has space"}, {}, "AUTH_TOKEN must be printable ASCII"),
        ({"AUTH_TOKEN": WRITE, "AUTH_TOKEN_FILE": "f"}, {"f": "x"}, "not both"),
        ({"AUTH_TOKEN_FILE": "missing"}, {}, "AUTH_TOKEN_FILE cannot be read"),
        ({"AUTH_TOKEN_FILE": "f"}, {"f": "\n"}, "AUTH_TOKEN_FILE is empty"),
        ({"AUTH_TOKEN_FILE": "f"}, {"f": "two\nlines"}, "one token without spaces"),
        ({"AUTH_READ_TOKEN": READ}, {}, "AUTH_READ_TOKEN needs AUTH_TOKEN"),
        ({"AUTH_TOKEN": WRITE, "AUTH_READ_TOKEN": WRITE}, {}, "must differ"),
    ],
)
def test_bad_token_settings_fail_with_one_line_that_never_shows_a_token(
    tmp_path, environ, files, message
):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    environ = {k: str(tmp_path / v) if k.endswith("_FILE") else v for k, v in environ.items()}
    with pytest.raises(ConfigError) as raised:
        read_token_files(resolve({}, environ))
    text = str(raised.value)
    assert message in text
    assert "\n" not in text
    for secret in (WRITE, READ, "has space", "two"):
        assert secret not in text


def test_access_control_is_off_unless_a_token_is_set():
    assert Access.from_config(default_config()) is None
    assert Access.from_config(default_config(auth_token=WRITE)) is not None


# -- a real process


def test_a_node_reads_its_token_file_and_never_logs_a_token(dache_process, tmp_path):
    (tmp_path / "token").write_text(WRITE + "\n")
    node = dache_process(env={"AUTH_TOKEN_FILE": str(tmp_path / "token"), "ACCESS_LOG": "true"})
    headers = bearer(WRITE)
    assert node.request("POST", "/dache/k", b'{"value":1}', headers)[0] == 204
    assert node.request("GET", "/dache/k", headers=headers)[0] == 200
    assert node.request("GET", "/dache/k")[0] == 401
    wrong = "wrong-" + WRITE
    assert node.request("DELETE", "/dache/k", headers=bearer(wrong))[0] == 401
    status, response_headers, body = node.request("GET", "/health")
    assert status == 200 and json.loads(body) == {"status": "pass"}
    assert response_headers["Content-Length"] == str(len(body))
    assert node.terminate() == 0
    log = node.output()
    assert "dache stopped" in log
    assert '"GET /dache/k" 401' in log  # the access log logged the requests...
    assert '"DELETE /dache/k" 401' in log
    assert "write-token" not in log  # ... but no token, right or wrong


def test_a_bad_token_file_stops_start_up_with_one_line(dache_process, tmp_path):
    node = dache_process(env={"AUTH_TOKEN_FILE": str(tmp_path / "missing")}, wait=False)
    assert node.wait_exit() == 2
    assert "configuration error: AUTH_TOKEN_FILE cannot be read" in node.output()
    assert "Traceback" not in node.output()
