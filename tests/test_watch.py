"""
Watching changes (dache/store/changes.py, dache/web/watch.py), driven in
memory through the whole HTTP stack (DacheSite, its channel, a
StringTransport) on a task.Clock: SSE framing, order, replay from `since` and
Last-Event-ID with no gap and no duplicate, reset past the history, prefix
filtering, expiry events, heartbeats, slow readers, blocking reads, shutdown.
"""

from __future__ import annotations

import json
from urllib.parse import quote

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from dache.engines import Change
from dache.testing import BASE, MemoryNode
from dache.web.fanout import PACE, PACE_MAX
from dache.web.site import DacheSite


class Client:
    """One HTTP connection to the node, reading a chunked text/event-stream."""

    def __init__(self, node: MemoryNode, request: bytes):
        self.clock = node.clock
        site = DacheSite(node.api.resource(), timeout=10, request_timeout=3, reactor=node.clock)
        address = IPv4Address("TCP", "127.0.0.1", 50000)
        self.channel = site.buildProtocol(address)
        self.transport = StringTransport(peerAddress=address)
        self.channel.makeConnection(self.transport)
        self.channel.dataReceived(request)

    def head_and_body(self) -> tuple[bytes, bytes]:
        self.clock.advance(0)  # events go out at the end of the reactor turn
        raw = self.transport.value()
        head, _, rest = raw.partition(b"\r\n\r\n")
        if b"transfer-encoding: chunked" not in head.lower():
            return head, rest
        body = b""
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            body += rest[:size]
            rest = rest[size + 2 :]
        return head, body

    def events(self) -> list[dict]:
        """Every complete event so far: {"id"?, "event", "data"} (comments left out)."""
        events = []
        for block in self.head_and_body()[1].decode("utf-8").split("\n\n")[:-1]:
            event: dict = {}
            data = []
            for line in block.split("\n"):
                if line.startswith(":"):
                    continue
                name, _, value = line.partition(": ")
                if name == "data":
                    data.append(value)
                else:
                    event[name] = value
            if event or data:
                event["data"] = json.loads("\n".join(data))
                events.append(event)
        return events

    def finished(self) -> bool:
        self.clock.advance(0)
        return self.transport.value().endswith(b"0\r\n\r\n")


def watch_request(query: str = "", headers: str = "") -> bytes:
    return f"GET /dache?watch=true{query} HTTP/1.1\r\nHost: dache\r\n{headers}\r\n".encode()


def write(node: MemoryNode, key: str, value: object = 1, expiry: float | None = None) -> int:
    d = node.committer.submit(Change.set(key, json.dumps(value).encode(), expiry))
    return d.result


def delete(node: MemoryNode, key: str) -> int:
    return node.committer.submit(Change.delete(key)).result


def test_a_watch_streams_every_change_in_revision_order_as_sse():
    node = MemoryNode()
    client = Client(node, watch_request())
    head, _ = client.head_and_body()
    assert head.startswith(b"HTTP/1.1 200")
    assert b"text/event-stream" in head.lower()
    r1 = write(node, "a", {"x": [1, 2]})
    r2 = write(node, "b", "two", expiry=node.clock.seconds() + 60)
    r3 = delete(node, "a")
    delete(node, "never-there")  # nothing changed: no event
    assert client.events() == [
        {
            "id": str(r1),
            "event": "set",
            "data": {"key": "a", "value": {"x": [1, 2]}, "revision": r1},
        },
        {
            "id": str(r2),
            "event": "set",
            "data": {
                "key": "b",
                "value": "two",
                "expiry": node.clock.seconds() + 60,
                "revision": r2,
            },
        },
        {"id": str(r3), "event": "delete", "data": {"key": "a", "revision": r3}},
    ]
    assert r1 < r2 < r3


def test_accept_text_event_stream_is_a_watch_too():
    node = MemoryNode()
    client = Client(node, b"GET /dache HTTP/1.1\r\nHost: d\r\nAccept: text/event-stream\r\n\r\n")
    r = write(node, "k")
    assert [e["id"] for e in client.events()] == [str(r)]


def test_since_replays_then_goes_live_with_no_gap_and_no_duplicate():
    node = MemoryNode()
    revisions = [write(node, f"k{i}", i) for i in range(10)]
    client = Client(node, watch_request(f"&since={revisions[3]}"))
    later = [write(node, f"k{i}", i) for i in range(10, 13)]
    ids = [int(e["id"]) for e in client.events()]
    assert ids == revisions[4:] + later


def test_last_event_id_resumes_where_a_dropped_stream_stopped():
    node = MemoryNode()
    first = Client(node, watch_request())
    for i in range(5):
        write(node, f"k{i}", i)
    seen = first.events()
    first.channel.connectionLost(Failure(ConnectionDone()))  # the client went away
    for i in range(5, 8):  # written while nobody watched
        write(node, f"k{i}", i)
    again = Client(node, watch_request(headers=f"Last-Event-ID: {seen[-1]['id']}\r\n"))
    write(node, "k8", 8)
    keys = [e["data"]["key"] for e in seen + again.events()]
    assert keys == [f"k{i}" for i in range(9)]
    assert node.watchers.feed.subscribers == 1  # the dropped one unsubscribed


def test_a_revision_older_than_the_history_gets_reset_first_never_a_silent_gap():
    node = MemoryNode()
    node.watchers.feed.history_count = 3
    for i in range(6):
        write(node, f"k{i}", i)
    client = Client(node, watch_request("&since=1"))
    current = node.watchers.feed.revision
    r = write(node, "after", 0)
    events = client.events()
    assert events[0] == {"id": str(current), "event": "reset", "data": {"revision": current}}
    assert [e["id"] for e in events[1:]] == [str(r)]
    # Within the history, the replay is exact.
    within = Client(node, watch_request(f"&since={current - 2}"))
    assert [int(e["id"]) for e in within.events()] == [current - 1, current, r]


def test_prefix_filters_keys_including_non_ascii_and_slashes():
    node = MemoryNode()
    client = Client(node, watch_request("&prefix=" + quote("用户/42/", safe="")))
    write(node, "用户/42/name", "Ada")
    write(node, "用户/43/name", "Bob")
    write(node, "用户/42", "not under the prefix")
    write(node, "用户/42//x", "double slash")
    write(node, "other", 0)
    keys = [e["data"]["key"] for e in client.events()]
    assert keys == ["用户/42/name", "用户/42//x"]


def test_each_change_reaches_each_matching_watcher_once():
    node = MemoryNode()
    everything = Client(node, watch_request())
    users = Client(node, watch_request("&prefix=user"))
    user1 = Client(node, watch_request("&prefix=user1"))
    write(node, "user1", 1)
    write(node, "user2", 2)
    write(node, "x", 3)
    assert len(everything.events()) == 3
    assert [e["data"]["key"] for e in users.events()] == ["user1", "user2"]
    assert [e["data"]["key"] for e in user1.events()] == ["user1"]
    assert node.watchers.feed.released == 3


def test_an_expiry_is_one_expire_event_at_the_sweep_without_an_id():
    node = MemoryNode()
    client = Client(node, watch_request())
    r = write(node, "session", "s", expiry=node.clock.seconds() + 5)
    node.clock.advance(6)
    node.cache.expire(node.clock.seconds())  # the service's sweep
    node.cache.expire(node.clock.seconds())
    events = client.events()
    assert events[-1] == {"event": "expire", "data": {"key": "session", "revision": r}}
    assert len(events) == 2


def test_values_with_line_breaks_stay_one_event():
    node = MemoryNode()
    client = Client(node, watch_request())
    change = Change.set("k", b'{"a":\n 1,\r\n "b": 2}')
    node.committer.submit(change)
    assert client.events()[0]["data"]["value"] == {"a": 1, "b": 2}


def test_heartbeats_keep_an_idle_stream_open_past_the_idle_timeout():
    node = MemoryNode()
    client = Client(node, watch_request())
    for _ in range(8):  # 120 s: twice IDLE_TIMEOUT (10 s here) and REQUEST_TIMEOUT
        node.clock.advance(15)
    assert client.transport.connected and not client.transport.disconnecting
    assert client.head_and_body()[1].count(b": heartbeat\n\n") == 8
    r = write(node, "k")
    assert client.events()[-1]["id"] == str(r)


def test_a_watcher_that_does_not_read_is_dropped_at_its_buffer_and_others_go_on():
    node = MemoryNode()
    node.watchers.buffer_bytes = 4096
    slow = Client(node, watch_request())
    fast = Client(node, watch_request())
    slow.channel.pauseProducing()  # what the transport does when the client stops reading
    for i in range(100):  # one write per reactor turn
        write(node, f"k{i}", "x" * 50)
        node.clock.advance(0)
    assert node.watchers.dropped_slow == 1
    assert slow.events()[-1]["event"] == "error"
    assert "WATCH_BUFFER" in slow.events()[-1]["data"]["error"]
    assert slow.finished()
    node.clock.advance(10)
    assert slow.transport.disconnecting
    assert len(fast.events()) == 100
    assert len(node.watchers.streams) == 1


def test_a_paused_watcher_under_its_buffer_gets_everything_on_resume():
    node = MemoryNode()
    client = Client(node, watch_request())
    client.channel.pauseProducing()
    for i in range(10):
        write(node, f"k{i}", i)
    client.channel.resumeProducing()
    assert len(client.events()) == 10


def test_shutdown_ends_every_stream_cleanly():
    node = MemoryNode()
    clients = [Client(node, watch_request()) for _ in range(3)]
    node.watchers.close()
    assert all(c.finished() for c in clients)
    refused = Client(node, watch_request())
    assert refused.head_and_body()[0].startswith(b"HTTP/1.1 503")


def test_bad_watch_parameters_are_400_json():
    node = MemoryNode()
    for query in ("&since=-1", "&since=abc", "&prefix=%ff"):
        client = Client(node, watch_request(query))
        head, body = client.head_and_body()
        assert head.startswith(b"HTTP/1.1 400"), query
        assert "error" in json.loads(body)
    assert node.watchers.open == 0


def test_watchers_are_bounded_by_watch_max():
    node = MemoryNode()
    node.watchers.max_open = 2
    Client(node, watch_request())
    Client(node, watch_request())
    third = Client(node, watch_request())
    assert third.head_and_body()[0].startswith(b"HTTP/1.1 503")


# -- blocking reads


def get(key: str, query: str) -> bytes:
    return f"GET /dache/{key}?{query} HTTP/1.1\r\nHost: d\r\n\r\n".encode()


def test_a_blocking_read_answers_at_the_change():
    node = MemoryNode()
    r1 = write(node, "k", 1)
    client = Client(node, get("k", f"wait=30&revision={r1}"))
    node.clock.advance(5)
    assert client.transport.value() == b""
    r2 = write(node, "k", 2)
    head, body = client.head_and_body()
    assert head.startswith(b"HTTP/1.1 200")
    assert f'ETag: "{r2}"'.encode() in head
    assert json.loads(body) == {"key": "k", "value": 2}
    assert node.watchers.open == 0


def test_a_blocking_read_answers_the_unchanged_entry_after_wait():
    node = MemoryNode()
    r1 = write(node, "k", 1)
    client = Client(node, get("k", "wait=30"))
    write(node, "other", 0)
    node.clock.advance(29)
    assert client.transport.value() == b""
    node.clock.advance(1)
    head, body = client.head_and_body()
    assert f'ETag: "{r1}"'.encode() in head and json.loads(body)["value"] == 1


def test_a_blocking_read_answers_at_once_when_the_revision_is_already_passed():
    node = MemoryNode()
    r1 = write(node, "k", 1)
    write(node, "k", 2)
    client = Client(node, get("k", f"wait=30&revision={r1}"))
    assert json.loads(client.head_and_body()[1])["value"] == 2


def test_a_blocking_read_sees_a_delete_and_a_creation():
    node = MemoryNode()
    r1 = write(node, "k", 1)
    deleted = Client(node, get("k", f"wait=30&revision={r1}"))
    created = Client(node, get("new", "wait=30&revision=0"))
    delete(node, "k")
    assert deleted.head_and_body()[0].startswith(b"HTTP/1.1 404")
    assert created.transport.value() == b""
    write(node, "new", "hi")
    assert json.loads(created.head_and_body()[1])["value"] == "hi"


def test_blocking_read_parameters_are_checked():
    node = MemoryNode()
    for query in ("wait=301", "wait=-1", "wait=x", "wait=5&revision=x"):
        client = Client(node, get("k", query))
        head, body = client.head_and_body()
        assert head.startswith(b"HTTP/1.1 400"), query
        assert "error" in json.loads(body)


def test_a_read_token_can_watch_and_no_token_cannot():
    from dache.web.auth import Access

    node = MemoryNode(access=Access("write-token-123456", "read-token-123456"))
    refused = Client(node, watch_request())
    assert refused.head_and_body()[0].startswith(b"HTTP/1.1 401")
    reader = Client(node, watch_request(headers="Authorization: Bearer read-token-123456\r\n"))
    r = write(node, "k")
    assert [e["id"] for e in reader.events()] == [str(r)]
    assert node.watchers.open == 1


def _call(node: MemoryNode, method: str, path: str, body: object) -> int:
    d = node.http.request(method, BASE + path, data=json.dumps(body).encode())
    node.clock.advance(0)
    return d.result.code


def test_key_space_writes_are_watched_like_single_writes():
    """A batch, a PATCH and a range delete reach a watcher as their SETs and DELETEs."""
    node = MemoryNode()
    client = Client(node, watch_request(f"&prefix={quote('u/')}"))
    ops = [("set", "u/a", 1), ("set", "u/b", 2), ("set", "other", 3), ("get", "u/a", None)]
    batch = {"ops": [{"op": op, "key": key, "value": value} for op, key, value in ops]}
    batch["ops"][-1].pop("value")
    assert _call(node, "POST", "/dache", batch) == 200
    assert _call(node, "PATCH", "/dache/u%2Fa", {"increment": 41}) == 200
    assert _call(node, "DELETE", f"/dache?prefix={quote('u/', safe='')}", None) == 200
    got = [(e["event"], e["data"]["key"], e["data"].get("value")) for e in client.events()]
    assert got == [
        ("set", "u/a", 1),
        ("set", "u/b", 2),
        ("set", "u/a", 42),
        ("delete", "u/a", None),
        ("delete", "u/b", None),
    ]
    ids = [int(e["id"]) for e in client.events()]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


# -- the fan-out (dache/web/fanout.py): encoded once, one write per watcher per turn


class CountingTransport(StringTransport):
    writes = 0
    last: bytes = b""

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.last = data
        super().write(data)


def counted_client(node: MemoryNode, request: bytes) -> Client:
    client = Client.__new__(Client)
    client.clock = node.clock
    site = DacheSite(node.api.resource(), timeout=10, request_timeout=3, reactor=node.clock)
    address = IPv4Address("TCP", "127.0.0.1", 50000)
    client.site = site
    client.channel = site.buildProtocol(address)
    client.transport = CountingTransport(peerAddress=address)
    client.channel.makeConnection(client.transport)
    client.channel.dataReceived(request)
    client.head_and_body()
    return client


def test_a_turn_of_many_writes_is_one_write_per_watcher_after_the_writes_are_answered():
    node = MemoryNode()
    watchers = [counted_client(node, watch_request()) for _ in range(3)]
    before = [w.transport.writes for w in watchers]
    writer = counted_client(node, b"")
    body = b'{"value": 1}'
    for i in range(16):  # sixteen writes answered in one reactor turn
        writer.channel.dataReceived(
            b"PUT /dache/k%d HTTP/1.1\r\nHost: d\r\nContent-Length: %d\r\n\r\n%s"
            % (i, len(body), body)
        )
    assert writer.transport.value().count(b"HTTP/1.1 204") == 16  # answered: durable
    assert [w.transport.writes for w in watchers] == before  # no watcher written yet
    node.clock.advance(0)  # the end of the turn: the fan-out
    assert [w.transport.writes - b for w, b in zip(watchers, before, strict=True)] == [1, 1, 1]
    for w in watchers:
        assert [e["data"]["key"] for e in w.events()] == [f"k{i}" for i in range(16)]
    ids = [int(e["id"]) for e in watchers[0].events()]
    assert ids == sorted(ids)
    assert node.watchers.events_sent == 3 * 16
    shared = watchers[0].transport.last
    assert all(w.transport.last is shared for w in watchers)  # one bytes object for all


def test_a_watcher_that_begins_mid_turn_gets_each_event_once():
    node = MemoryNode()
    early = Client(node, watch_request())
    r1 = write(node, "a")  # queued for this turn's fan-out, not written yet
    replaying = Client(node, watch_request("&since=0"))  # its replay has "a"
    live = Client(node, watch_request())  # begins at r1: "a" is not news to it
    r2 = write(node, "b")
    assert [int(e["id"]) for e in early.events()] == [r1, r2]
    assert [int(e["id"]) for e in replaying.events()] == [r1, r2]
    assert [int(e["id"]) for e in live.events()] == [r2]


def test_a_flush_that_took_long_delays_the_next_by_pace_times_as_much_within_pace_max():
    node = MemoryNode()
    client = Client(node, watch_request())
    fanouts = node.watchers.fanouts
    spent = iter([0.0, 0.004, 0.0, 0.5])  # flushes of 4 ms of CPU, then of 500 ms
    fanouts.cpu_time = lambda: next(spent, 0.0)
    write(node, "a")
    node.clock.advance(0)
    assert len(client.events()) == 1
    write(node, "b")
    write(node, "c")
    node.clock.advance(PACE * 0.004 - 0.001)
    assert len(client.events()) == 1  # paced
    node.clock.advance(0.001)
    assert [e["data"]["key"] for e in client.events()] == ["a", "b", "c"]
    assert fanouts.flushes == 2  # b and c: one flush
    write(node, "d")
    node.clock.advance(PACE_MAX)  # however long a flush took, an event waits at most this
    assert [e["data"]["key"] for e in client.events()][-1] == "d"


def test_a_watch_moves_its_connection_off_the_max_connections_count():
    node = MemoryNode()
    stream = counted_client(node, watch_request())
    assert stream.site.open_connections == 0  # counted by WATCH_MAX instead
    poll = counted_client(node, get("k", "wait=30"))
    assert poll.site.open_connections == 0
    write(node, "k")
    node.clock.advance(0)  # the blocking read answers; its connection serves again
    assert poll.site.open_connections == 1
    node.watchers.close()  # the stream ends; the connection stays open
    assert stream.site.open_connections == 1
    stream.channel.connectionLost(Failure(ConnectionDone()))
    assert stream.site.open_connections == 0


def test_an_http_1_0_watcher_gets_the_events_unframed():
    node = MemoryNode()
    old = Client(node, b"GET /dache?watch=true HTTP/1.0\r\n\r\n")
    new = Client(node, watch_request())
    r = write(node, "k")
    assert [int(e["id"]) for e in new.events()] == [r]  # (the turn ends)
    body = old.transport.value().partition(b"\r\n\r\n")[2]
    assert b"id: %d\nevent: set\n" % r in body
    assert b"\r\n" not in body  # no chunk framing
