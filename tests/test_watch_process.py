"""
Watching changes with real processes and sockets: three nodes on one
PostgreSQL table with a watcher on each, a watched node killed -9 and the
watcher resumed on another node with Last-Event-ID; many idle watchers; a
stream ended by SIGTERM; blocking reads. Every wait polls with a deadline.
"""

from __future__ import annotations

import json
import re
import resource
import selectors
import socket
import threading
import time
from urllib.parse import quote

from tests.test_scale_out import start, wait_until


class Watcher:
    """A text/event-stream reader on its own thread: the events as they arrive."""

    def __init__(self, port: int, query: str = "", headers: str = ""):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        request = f"GET /dache?watch=true{query} HTTP/1.1\r\nHost: dache\r\n{headers}\r\n"
        self.sock.sendall(request.encode())
        self.events: list[dict] = []
        self.comments: list[str] = []
        self.closed = False
        self.status = None
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        stream = self.sock.makefile("rb")
        try:
            self.status = int(stream.readline().split()[1])
            while stream.readline() not in (b"\r\n", b""):
                pass
            event: dict = {}
            while True:
                size = stream.readline()
                if not size or int(size, 16) == 0:
                    break
                chunk = stream.read(int(size, 16))
                stream.readline()
                for line in chunk.decode().split("\n"):
                    self._line(line, event)
        except OSError:
            pass
        self.closed = True

    def _line(self, line: str, event: dict) -> None:
        if line == "":
            if event:
                event["data"] = json.loads(event["data"])
                self.events.append(dict(event))
                event.clear()
        elif line.startswith(":"):
            self.comments.append(line)
        else:
            name, _, value = line.partition(": ")
            event[name] = value

    def ids(self) -> list[int]:
        return [int(e["id"]) for e in self.events if "id" in e]

    def close(self) -> None:
        self.sock.close()


def raise_file_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:  # the node started after this inherits it
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, needed), hard))


def put(node, key: str, value) -> int:
    status, headers, _ = node.request(
        "PUT", "/dache/" + quote(key, safe=""), json.dumps({"value": value}).encode()
    )
    assert status == 204
    return int({k.lower(): v for k, v in headers.items()}["etag"].strip('"'))


def test_three_nodes_each_watcher_sees_the_same_sequence_and_resumes_after_kill_9(
    dache_process, pg
):
    nodes = [start(dache_process, pg, DURABILITY_ENGINE="postgres") for _ in range(3)]
    watchers = [Watcher(node.port) for node in nodes]
    wait_until(lambda: all(w.comments for w in watchers))
    acknowledged = [put(nodes[i % 3], f"w/{i}", i) for i in range(60)]
    wait_until(lambda: all(len(w.events) >= 60 for w in watchers), timeout=20)
    sequences = [w.ids() for w in watchers]
    assert sequences[0] == sorted(acknowledged)
    assert sequences[0] == sequences[1] == sequences[2]
    assert [e["data"]["key"] for e in watchers[1].events] == [
        f"w/{i}" for i in sorted(range(60), key=lambda i: acknowledged[i])
    ]

    # Kill -9 the node the first watcher is on, while writes go on elsewhere.
    watched = watchers[0]
    more = [put(nodes[1 + i % 2], f"x/{i}", i) for i in range(20)]
    nodes[0].kill()
    wait_until(lambda: watched.closed)
    more += [put(nodes[1 + i % 2], f"y/{i}", i) for i in range(20)]
    last = watched.ids()[-1]
    resumed = Watcher(nodes[1].port, headers=f"Last-Event-ID: {last}\r\n")
    more += [put(nodes[2], f"z/{i}", i) for i in range(10)]
    everything = acknowledged + more
    wait_until(lambda: set(watched.ids() + resumed.ids()) >= set(everything), timeout=20)
    union = watched.ids() + resumed.ids()
    assert sorted(union) == sorted(everything)  # every acknowledged change exactly once
    assert union == sorted(union)  # and in revision order


def test_idle_watchers_cost_no_cpu_and_a_slow_reader_is_dropped_while_others_receive(
    dache_process,
):
    count = 2000
    raise_file_limit(count + 500)
    node = dache_process(
        env={"DURABILITY_ENGINE": "memory", "WATCH_BUFFER": "1048576", "MAX_CONNECTIONS": "4000"}
    )
    sockets = []
    opening = time.monotonic()
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", node.port), timeout=30)
        s.sendall(b"GET /dache?watch=true&prefix=idle HTTP/1.1\r\nHost: d\r\n\r\n")
        # Its headers came: the stream is open (and the listen backlog never overflows).
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        sockets.append(s)

    def cpu_seconds() -> float:
        with open(f"/proc/{node.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in ticks

    print(f"{count} watchers open in {time.monotonic() - opening:.1f}s")
    before = cpu_seconds()
    time.sleep(3)
    idle_cpu = cpu_seconds() - before
    print(f"{count} idle watchers: {idle_cpu:.2f}s CPU in 3 s")
    assert idle_cpu < 0.5, f"{count} idle watchers took {idle_cpu:.2f}s of CPU in 3 s"

    # A reader that never reads, among readers that do.
    slow = socket.create_connection(("127.0.0.1", node.port), timeout=30)
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.sendall(b"GET /dache?watch=true&prefix=busy HTTP/1.1\r\nHost: d\r\n\r\n")
    reader = Watcher(node.port, "&prefix=busy")
    wait_until(lambda: reader.comments)
    value = "v" * 100_000  # big events: the kernel's socket buffers fill in a few dozen writes
    written = 0
    while b"dache_watchers_dropped_slow_total 0.0" in node.request("GET", "/metrics")[2]:
        put(node, f"busy/{written}", value)
        written += 1
        assert written < 500, "the slow reader was never dropped"
    print(f"slow reader dropped after {written} writes")
    wait_until(lambda: len(reader.events) == written)
    assert not reader.closed  # the reader that reads is still served
    assert b"dache_watchers_dropped_slow_total 1.0" in node.request("GET", "/metrics")[2]
    for s in [*sockets, slow]:
        s.close()


def test_sigterm_ends_streams_cleanly_and_blocking_reads_answer_fast(dache_process):
    node = dache_process(env={"DURABILITY_ENGINE": "disk"})
    revision = put(node, "k", 1)
    answers = {}

    def blocking_read():
        began = time.monotonic()
        status, headers, body = node.request("GET", f"/dache/k?wait=30&revision={revision}")
        answers["after"] = time.monotonic() - began
        answers["value"] = json.loads(body)["value"]

    thread = threading.Thread(target=blocking_read)
    thread.start()
    time.sleep(0.5)  # the read is waiting (nothing to poll for: it answers at the change)
    changed_at = time.monotonic()
    put(node, "k", 2)
    thread.join(timeout=10)
    assert answers["value"] == 2
    print(f"blocking read answered {time.monotonic() - changed_at:.3f}s after the write")

    began = time.monotonic()
    status, _, body = node.request("GET", "/dache/k?wait=1")
    assert status == 200 and 1.0 <= time.monotonic() - began < 5
    assert json.loads(body)["value"] == 2

    watcher = Watcher(node.port)
    wait_until(lambda: watcher.comments)
    assert node.terminate() == 0
    wait_until(lambda: watcher.closed)
    assert any("shutting down" in c for c in watcher.comments)


def test_a_node_without_the_history_replays_from_the_postgresql_table(dache_process, pg):
    a = start(dache_process, pg, DURABILITY_ENGINE="postgres")
    revisions = [put(a, f"t/{i}", i) for i in range(6)]
    status, _, _ = a.request("DELETE", "/dache/t%2F0")
    b = start(dache_process, pg, DURABILITY_ENGINE="postgres")  # its history starts now
    watcher = Watcher(b.port, query=f"&since={revisions[0]}")
    later = put(a, "t/later", 0)
    wait_until(lambda: any(e["data"]["key"] == "t/later" for e in watcher.events))
    got = [(e["event"], e["data"]["key"]) for e in watcher.events]
    assert got == [("set", f"t/{i}") for i in range(1, 6)] + [("delete", "t/0"), ("set", "t/later")]
    assert watcher.ids() == sorted(watcher.ids()) and watcher.ids()[-1] == later


class Readers:
    """Many watch streams read on one thread: each one's event ids, as they arrive."""

    ID = re.compile(rb"\nid: (\d+)\n")

    def __init__(self, sockets: list[socket.socket]):
        self.ids: dict[socket.socket, list[int]] = {s: [] for s in sockets}
        self._tail = {s: b"" for s in sockets}
        self.selector = selectors.DefaultSelector()
        for s in sockets:
            s.setblocking(False)
            self.selector.register(s, selectors.EVENT_READ)
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.running:
            for key, _ in self.selector.select(0.1):
                s = key.fileobj
                try:
                    data = s.recv(1 << 20)
                except BlockingIOError:
                    continue
                text = self._tail[s] + data
                end = text.rfind(b"\n\n") + 2  # up to the last whole event
                self.ids[s].extend(int(i) for i in self.ID.findall(b"\n" + text[:end]))
                self._tail[s] = text[end:]

    def stop(self) -> None:
        self.running = False
        self.thread.join()


def open_watch(node, prefix: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", node.port), timeout=30)
    s.sendall(f"GET /dache?watch=true&prefix={prefix} HTTP/1.1\r\nHost: d\r\n\r\n".encode())
    return s


def test_a_thousand_watchers_get_every_event_of_a_burst_in_order_past_max_connections(
    dache_process,
):
    count = 1000
    raise_file_limit(count + 500)
    node = dache_process(
        env={
            "DURABILITY_ENGINE": "memory",
            "MAX_CONNECTIONS": "20",  # the watchers are not counted against it
            "WATCH_MAX": str(count + 1),  # the readers and one that never reads
            "WATCH_BUFFER": "16384",
            "OUTPUT_BUFFER_BYTES": "4096",
        }
    )
    sockets = []
    for _ in range(count):
        s = open_watch(node, "burst/")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")  # one at a time: no backlog overflow
        sockets.append(s)
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(("127.0.0.1", node.port))
    slow.sendall(b"GET /dache?watch=true HTTP/1.1\r\nHost: d\r\n\r\n")  # every key
    wait_until(
        lambda: b'dache_watchers{kind="stream"} 1001.0' in node.request("GET", "/metrics")[2]
    )

    # At WATCH_MAX: one more watcher is refused, and GET and SET still answer.
    refused = open_watch(node, "burst/")
    answer = refused.recv(4096)
    assert answer.startswith(b"HTTP/1.1 503")
    assert "WATCH_MAX" in json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
    refused.close()
    put(node, "plain", 1)
    status, _, body = node.request("GET", "/dache/plain")
    assert status == 200 and json.loads(body)["value"] == 1

    readers = Readers(sockets)
    acked: list[int] = []
    value = "v" * 100

    def writer(n: int) -> None:
        for i in range(50):
            acked.append(put(node, f"burst/{n}/{i}", value))

    def big_writer() -> None:  # big values the slow one alone watches: its buffers fill
        for i in range(300):
            put(node, f"big/{i}", "b" * 100_000)
            if i % 10 == 9 and dropped() == 1:
                return

    def dropped() -> float:
        metrics = node.request("GET", "/metrics")[2].decode()
        return float(
            re.search(r"^dache_watchers_dropped_slow_total (\S+)$", metrics, re.M).group(1)
        )

    began = time.monotonic()
    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    threads.append(threading.Thread(target=big_writer))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    written = time.monotonic() - began
    # Every reader gets every event, in revision order, within a deadline, while
    # the one that never reads is dropped at its bound.
    wait_until(lambda: all(len(ids) >= len(acked) for ids in readers.ids.values()), timeout=30)
    print(
        f"{len(acked)} writes in {written:.1f}s; {count} watchers had them all "
        f"{time.monotonic() - began - written:.1f}s later"
    )
    readers.stop()
    expected = sorted(acked)
    assert all(ids == expected for ids in readers.ids.values())
    assert dropped() == 1
    for s in [*sockets, slow]:
        s.close()
