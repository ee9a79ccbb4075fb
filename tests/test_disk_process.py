"""
The disk engine end to end: `twistd -n dache` subprocesses over a real
socket and a real file system, restarted, SIGKILLed, refused, and starved of
file size with a real RLIMIT_FSIZE.
"""

import json
import os
import random
import resource
import subprocess
import threading
import time
from http.client import HTTPConnection
from urllib.parse import quote

from dache.engines.disk import LOG_NAME
from dache.engines.disklog import FRAME, HEADER
from tests.process import TWISTD


def disk(path, **settings):
    return {"DISK_PATH": str(path), **settings}


def test_disk_is_the_default_and_content_is_identical_after_a_clean_restart(
    dache_process, tmp_path, monkeypatch
):
    monkeypatch.delenv("DURABILITY_ENGINE", raising=False)
    env = disk(tmp_path)
    node = dache_process(env=env)
    assert "engine: disk" in node.output()
    values = {
        "plain": "text",
        "a/b c%ü": {"nested": [1, 2.5, None, True]},
        "big int": 123456789012345678901234567890,
        "with ttl": "expires later",
    }
    for key, value in values.items():
        extra = {"ttl": 3600} if key == "with ttl" else {}
        assert node.set(key, value, **extra) == 204
    assert node.set("int expiry", 1, expiry=4_000_000_000) == 204
    assert node.set("gone", 0) == 204 and node.delete("gone") == 204
    before = {key: node.request("GET", "/dache/" + quote(key, safe=""))[2] for key in values}
    assert node.terminate() == 0

    again = dache_process(env=env)
    for key, body in before.items():
        assert again.request("GET", "/dache/" + quote(key, safe=""))[2] == body
    assert again.get("int expiry")[1]["expiry"] == 4_000_000_000
    assert again.get("gone")[0] == 404
    assert os.path.exists(tmp_path / LOG_NAME)


class Writer(threading.Thread):
    """Sets and deletes its own keys, one request at a time, remembering the answers."""

    def __init__(self, port, name, state):
        super().__init__(daemon=True)
        self.port, self.name, self.state = port, name, state
        self.in_flight = None  # (key, value or None for a delete), sent but not answered
        self.unexpected = None
        self.acknowledged = 0
        self.stop = False

    def run(self):
        connection = HTTPConnection("127.0.0.1", self.port, timeout=10)
        rng = random.Random(self.name)
        try:
            while not self.stop:
                key = f"{self.name}-{rng.randrange(10)}"
                if rng.random() < 0.2:
                    method, value, body = "DELETE", None, None
                else:
                    value = f"{self.name} {rng.randrange(10**9)}"
                    method, body = "POST", json.dumps({"value": value}).encode()
                self.in_flight = (key, value)
                connection.request(method, "/dache/" + quote(key), body=body)
                response = connection.getresponse()
                response.read()
                if response.status != 204:
                    self.unexpected = f"{method} {key}: {response.status}"
                    return
                self.state[key] = value  # acknowledged
                self.acknowledged += 1
                self.in_flight = None
        except (OSError, ConnectionError):
            pass  # the node was killed under us
        finally:
            connection.close()


def test_sigkill_during_concurrent_writes_loses_nothing_acknowledged(dache_process, tmp_path):
    # Compacting every few hundred writes, so kills land in compactions too.
    env = disk(tmp_path, DISK_COMPACT_MIN_BYTES="16384")
    acknowledged = {}  # key -> the value its last acknowledged write left (None: deleted)
    writes = compactions = 0
    for round in range(4):
        node = dache_process(env=env)
        writers = [Writer(node.port, f"r{round}w{i}", {}) for i in range(8)]
        for writer in writers:
            writer.start()
        time.sleep(0.5 + random.random() * 0.5)
        node.kill()  # SIGKILL, mid-write
        allowed = {key: {value} for key, value in acknowledged.items()}
        compactions += sum("compacted" in line for line in node.lines)
        for writer in writers:
            writer.join(10)
            assert writer.unexpected is None, writer.unexpected
            writes += writer.acknowledged
            for key, value in writer.state.items():
                allowed[key] = {value}
            if writer.in_flight is not None:
                # Sent but unanswered: it may or may not have landed.
                key, value = writer.in_flight
                allowed.setdefault(key, {None}).add(value)

        node = dache_process(env=env)
        for key, values in allowed.items():
            status, body = node.get(key)
            served = body["value"] if status == 200 else None
            assert served in values, (key, served, values)
            acknowledged[key] = served
        node.kill()
    assert writes > 400  # the rounds really wrote under load
    assert compactions > 0


def records(path):
    """(offset, length) of each record of a log."""
    data = open(path, "rb").read()
    out, offset = [], HEADER.size
    while offset < len(data):
        length = FRAME.unpack_from(data, offset)[0]
        out.append((offset, FRAME.size + length))
        offset += FRAME.size + length
    return out


def run_twistd(*args, env):
    return subprocess.run(
        [TWISTD, "-n", "--pidfile=", "dache", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_corruption_refuses_start_naming_the_offset_and_repair_recovers_the_prefix(
    dache_process, tmp_path
):
    env = disk(tmp_path)
    node = dache_process(env=env)
    for i in range(6):
        assert node.set(f"k{i}", i) == 204  # one record each
    assert node.terminate() == 0
    log = tmp_path / LOG_NAME
    offset, length = records(log)[3]
    data = bytearray(log.read_bytes())
    data[offset + length // 2] ^= 0x10  # inside k3's record
    log.write_bytes(bytes(data))

    refused = dache_process(env=env, wait=False)
    assert refused.wait_exit() == 1
    lines = [line for line in refused.lines if "could not start" in line]
    assert len(lines) == 1
    assert f"{log} is corrupt at offset {offset}" in lines[0]
    assert "Traceback" not in refused.output()

    repaired = run_twistd("--repair", env=env)
    assert repaired.returncode == 0, repaired.stderr
    assert f"corrupt at offset {offset}" in repaired.stdout and "backup" in repaired.stdout
    (backup,) = [p for p in os.listdir(tmp_path) if p.startswith(LOG_NAME + ".corrupt-")]
    assert (tmp_path / backup).read_bytes() == bytes(data)

    again = dache_process(env=env)
    assert [again.get(f"k{i}")[0] for i in range(6)] == [200, 200, 200, 404, 404, 404]
    assert again.get("k2")[1]["value"] == 2
    assert again.set("k3", "written again") == 204


def test_a_second_process_on_the_same_directory_refuses_to_start(dache_process, tmp_path):
    env = disk(tmp_path)
    first = dache_process(env=env)
    second = dache_process(env=env, wait=False)
    assert second.wait_exit() == 1
    lines = [line for line in second.lines if "could not start" in line]
    assert len(lines) == 1
    assert f"is in use by another dache process (pid {first.proc.pid})" in lines[0]
    assert first.set("still", "serving") == 204
    assert run_twistd("--repair", env=env).returncode == 1  # repair waits its turn too


def test_a_full_disk_answers_503_changes_nothing_and_later_writes_succeed(dache_process, tmp_path):
    env = disk(tmp_path)
    node = dache_process(env=env)
    assert node.set("k", "before") == 204
    log = tmp_path / LOG_NAME
    size = os.path.getsize(log)
    # The kernel now refuses to grow any file of the node's past size + 40
    # bytes (EFBIG; Python ignores SIGXFSZ): the next record is written in
    # part, then fails, as on a full disk.
    unlimited = resource.prlimit(node.proc.pid, resource.RLIMIT_FSIZE)
    resource.prlimit(node.proc.pid, resource.RLIMIT_FSIZE, (size + 40, unlimited[1]))

    status, headers, body = node.request(
        "POST", "/dache/k", json.dumps({"value": "x" * 1000}).encode()
    )
    assert status == 503 and headers.get("Retry-After") == "1"
    assert "could not write its log: File too large" in json.loads(body)["error"]
    assert node.set("new", "refused") == 503
    assert node.get("k")[1]["value"] == "before" and node.get("new")[0] == 404
    assert os.path.getsize(log) == size  # the part written was cut back off
    health = json.loads(node.request("GET", "/health")[2])
    assert health["status"] == "warn" and "File too large" in json.dumps(health)

    resource.prlimit(node.proc.pid, resource.RLIMIT_FSIZE, unlimited)
    assert node.set("k2", "after") == 204  # not wedged: the next write goes through
    deadline = time.monotonic() + 10
    while json.loads(node.request("GET", "/health")[2])["status"] != "pass":
        assert time.monotonic() < deadline, "health did not recover"
        time.sleep(0.1)
    node.kill()

    again = dache_process(env=env)
    assert again.get("k")[1]["value"] == "before"
    assert again.get("new")[0] == 404  # a 503'd write never comes back
    assert again.get("k2")[1]["value"] == "after"
    assert any("writing" in line and "File too large" in line for line in node.lines)
