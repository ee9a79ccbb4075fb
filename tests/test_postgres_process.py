"""
End to end with PostgreSQL: `twistd -n dache` subprocesses over real sockets,
killed, restarted, and left without their database. Polls have deadlines.
"""

import json
import os
import subprocess
import threading
import time
import uuid
from urllib.parse import quote

from tests.postgres import free_port
from tests.process import TWISTD


def start(dache_process, database, **env):
    return dache_process(env={**database.env, **{k: str(v) for k, v in env.items()}})


def get_raw(node, key):
    """(status, ETag, body bytes)."""
    status, headers, body = node.request("GET", "/dache/" + quote(key, safe=""))
    return status, {k.lower(): v for k, v in headers.items()}.get("etag"), body


def served(node, key):
    """(value, expiry) as the node serves it, or None for 404."""
    status, body = node.get(key)
    if status == 404:
        return None
    assert status == 200, (status, body)
    return body["value"], body.get("expiry")


def table(database, keys):
    rows = database.rows()
    return {k: (json.loads(rows[k][0]), rows[k][1]) if k in rows else None for k in keys}


def assert_memory_equals_table(node, database, keys):
    assert {k: served(node, k) for k in keys} == table(database, keys)


def wait_until(condition, timeout=10.0, step=0.05):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(step)


def clean(output):
    assert "Traceback" not in output, output
    assert "Unhandled" not in output, output


def test_content_survives_a_restart_on_the_same_database(dache_process, pg):
    first = start(dache_process, pg)
    assert first.set("a", 1) == 204
    assert first.set("b", {"x": [1, 2]}) == 204
    assert first.set("b", "two") == 204
    assert first.set("c", "gone soon") == 204
    assert first.delete("c") == 204
    assert first.set("d", "short-lived", ttl=1.5) == 204
    assert first.set("e", [True, None], expiry=time.time() + 3600.123456789) == 204
    bodies = {k: get_raw(first, k) for k in "abce"}
    assert first.terminate() == 0

    second = start(dache_process, pg)
    for key in "abe":
        assert get_raw(second, key) == bodies[key]  # byte for byte, expiry included
    assert served(second, "c") is None
    wait_until(lambda: served(second, "d") is None)
    assert_memory_equals_table(second, pg, "abce")
    # Revisions are the table's: an ETag from before the restart still matches.
    _, etag, _ = bodies["a"]
    change = b'{"value": 2}'
    assert second.request("PUT", "/dache/a", change, {"If-Match": etag})[0] == 204
    assert second.request("PUT", "/dache/a", change, {"If-Match": etag})[0] == 412
    clean(first.output() + second.output())


def test_every_acknowledged_write_survives_sigkill_in_the_middle_of_concurrent_writes(
    dache_process, pg
):
    node = start(dache_process, pg)
    writers = 16
    acknowledged = [0] * writers  # the last value each writer got a 204 for
    stop = threading.Event()

    def write(number):
        i = 0
        while not stop.is_set():
            i += 1
            try:
                status = node.set(f"w{number}", i)
            except OSError:
                return  # the node was killed
            if status != 204:
                return
            acknowledged[number] = i

    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    for thread in threads:
        thread.start()
    wait_until(lambda: sum(acknowledged) >= 300, timeout=30)
    node.kill()  # SIGKILL, writes in flight
    stop.set()
    for thread in threads:
        thread.join(10)

    restarted = start(dache_process, pg)
    keys = [f"w{n}" for n in range(writers)]
    for n, key in enumerate(keys):
        value, _ = served(restarted, key)
        # What was acknowledged is there; at most the one write in flight got further.
        assert acknowledged[n] <= value <= acknowledged[n] + 1, (key, acknowledged[n], value)
    assert_memory_equals_table(restarted, pg, keys)


def test_postgres_outage_reads_keep_working_writes_503_fast_then_recover(
    dache_process, own_postgres, own_pg
):
    node = start(dache_process, own_pg, WRITE_TIMEOUT=2)
    keys = [f"k{i}" for i in range(10)]
    for key in keys:
        assert node.set(key, key) == 204
    stop = threading.Event()
    outcomes = []

    def write(number):  # load running through the outage
        i = 0
        while not stop.is_set():
            i += 1
            began = time.monotonic()
            status = node.set(f"load{number}", i)
            outcomes.append((status, time.monotonic() - began))
            if status != 204:
                time.sleep(0.05)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(outcomes) >= 50)

    own_postgres.stop("immediate")
    during = len(outcomes)
    for key in keys:
        assert served(node, key) == (key, None)  # reads need no database
    for _ in range(3):
        began = time.monotonic()
        status, headers, body = node.request("POST", "/dache/k0", b'{"value": "changed"}')
        assert status == 503 and "error" in json.loads(body)
        assert time.monotonic() - began < 2.5  # within WRITE_TIMEOUT, never a hang
    assert served(node, "k0") == ("k0", None)  # unchanged by the failed write
    wait_until(lambda: any(s == 503 for s, _ in outcomes[during:]))

    own_postgres.start()
    wait_until(lambda: node.set("after", "outage") == 204, timeout=10)
    stop.set()
    for thread in threads:
        thread.join(10)
    failed = [seconds for status, seconds in outcomes[during:] if status != 204]
    assert failed and all(status in (204, 503) for status, _ in outcomes)
    assert max(failed) < 2.5
    all_keys = keys + ["after"] + [f"load{n}" for n in range(4)]
    assert_memory_equals_table(node, own_pg, all_keys)
    assert "lost PostgreSQL at" in node.output() and "writes resume" in node.output()
    clean(node.output())


def test_the_password_works_and_never_appears_in_output(
    dache_process, own_postgres, own_pg, tmp_path
):
    password, wrong = f"pw-{uuid.uuid4().hex}", f"wrong-{uuid.uuid4().hex}"
    role = f"dache_{uuid.uuid4().hex[:8]}"
    own_postgres.admin_sql(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    own_postgres.admin_sql(f"ALTER DATABASE {own_pg.name} OWNER TO {role}")
    over_tcp = {  # the test cluster asks for passwords over TCP only
        **own_pg.env,
        "POSTGRES_HOST": "127.0.0.1",
        "POSTGRES_USER": role,
    }

    refused = dache_process(
        env={**over_tcp, "POSTGRES_PASSWORD": wrong, "POSTGRES_CONNECT_TIMEOUT": "1"},
        wait=False,
    )
    assert refused.wait_exit(30) == 1
    assert "password authentication failed" in refused.output()
    critical = [line for line in refused.lines if "dache could not start" in line]
    assert len(critical) == 1 and "POSTGRES_CONNECT_TIMEOUT" in critical[0]

    secret = tmp_path / "secret"
    secret.write_text(password + "\n")
    node = dache_process(env={**over_tcp, "POSTGRES_PASSWORD_FILE": str(secret)})
    assert node.set("k", "v") == 204
    assert node.terminate() == 0
    node = dache_process(env={**over_tcp, "POSTGRES_PASSWORD": password})
    assert served(node, "k") == ("v", None)
    assert node.terminate() == 0

    output = refused.output() + node.output()
    assert password not in output and wrong not in output
    clean(node.output())


def test_sigterm_while_waiting_for_postgres_at_start_up_exits_cleanly(dache_process, pg):
    env = {**pg.env, "POSTGRES_HOST": "127.0.0.1", "POSTGRES_PORT": str(free_port())}
    node = dache_process(env=env, wait=False)
    wait_until(lambda: "is not reachable (attempt 2)" in node.output(), timeout=30)
    assert node.terminate() == 0
    assert "start-up cancelled" in node.output()
    clean(node.output())


def run_twistd(env):
    return subprocess.run(
        [TWISTD, "-n", "--pidfile=", "dache", "--listen=tcp:0:interface=127.0.0.1"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_missing_setting_stops_start_up_with_one_line(pg):
    env = {**pg.env}
    del env["POSTGRES_HOST"]
    result = run_twistd(env)
    assert result.returncode == 2
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert lines == [
        "dache: configuration error: "
        "POSTGRES_HOST is required for the postgres engine (or --postgres-host)"
    ]
