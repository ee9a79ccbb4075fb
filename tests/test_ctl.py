"""
dachectl and dache.client against a live `twistd dache`: every command, the
exit codes scripts rely on, one-line errors, tokens, Unix sockets and TLS.

Most commands run dache.ctl.main() in this process (the same code the
console script runs, without a Python start-up per call); the entry point,
`python -m dache.ctl` and the terminal-only progress bar are checked in real
subprocesses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from dache import client as dc
from dache import ctl
from tests.process import DacheProcess
from tests.terminal import run_in_terminal
from tests.test_tls import certificate, tls_listen  # noqa: F401 (a fixture)

DACHECTL = os.path.join(os.path.dirname(sys.executable), "dachectl")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def node():
    process = DacheProcess({"DURABILITY_ENGINE": "memory"}).start()
    yield process
    process.stop()


@pytest.fixture
def run(node, capsys, monkeypatch):
    """run(*argv, stdin=None) -> (exit code, stdout, stderr) of dachectl."""
    monkeypatch.setenv("DACHE_URL", f"http://127.0.0.1:{node.port}")
    for name in ("DACHE_TOKEN", "DACHE_TOKEN_FILE", "DACHE_OUTPUT", "DACHE_CA"):
        monkeypatch.delenv(name, raising=False)

    def run(*argv: str, stdin: str | None = None) -> tuple[int, str, str]:
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", _Lines(stdin))
        try:
            code = ctl.main(list(argv))
        except SystemExit as e:  # argparse's usage errors
            code = int(e.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    return run


class _Lines:
    """A stdin that is not a terminal."""

    def __init__(self, text: str):
        self.lines = iter(text.splitlines(keepends=True))
        self.text = text

    def __iter__(self):
        return self.lines

    def read(self) -> str:
        return self.text

    def readline(self) -> str:
        return next(self.lines, "")

    def isatty(self) -> bool:
        return False


def one_line(err: str) -> str:
    assert err.startswith("dachectl: ") and err.count("\n") == 1, err
    return err


# -- single keys


def test_set_then_get_prints_the_value_and_json_gives_the_entry(run):
    assert run("set", "user/42", '{"name": "Ada", "n": 12345678901234567890}') == (0, "", "")
    code, out, _ = run("get", "user/42")
    assert code == 0
    assert json.loads(out) == {"name": "Ada", "n": 12345678901234567890}
    code, out, _ = run("get", "user/42", "--output", "json")
    entry = json.loads(out)
    assert entry["key"] == "user/42" and entry["value"]["name"] == "Ada"
    assert isinstance(entry["revision"], int) and "expiry" not in entry


def test_global_options_go_before_or_after_the_command(run, node):
    run("set", "k", "1")
    url = f"http://127.0.0.1:{node.port}"
    assert run("--url", url, "-o", "json", "get", "k")[1] == run("get", "k", "--output=json")[1]


def test_a_string_value_with_string_and_a_non_json_value_is_a_usage_error(run):
    assert run("set", "s", "hello world", "--string")[0] == 0
    assert run("get", "s") == (0, "hello world\n", "")
    code, out, err = run("set", "s", "hello world")
    assert code == 2 and out == ""
    assert "not JSON" in one_line(err)
    assert run("get", "s")[1] == "hello world\n"  # unchanged


def test_ttl_and_expiry_are_stored(run):
    assert run("set", "t", "1", "--ttl", "3600")[0] == 0
    expiry = json.loads(run("get", "t", "-o", "json")[1])["expiry"]
    assert time.time() + 3500 < expiry <= time.time() + 3600
    at = time.time() + 7200
    assert run("set", "t", "2", "--expiry", str(at))[0] == 0
    assert json.loads(run("get", "t", "-o", "json")[1])["expiry"] == pytest.approx(at, abs=0.01)


def test_a_missing_key_exits_1_with_one_line_on_stderr(run):
    code, out, err = run("get", "no/such/key")
    assert code == 1 and out == ""
    assert "not found" in one_line(err)


def test_if_match_and_if_absent_exit_3_when_the_precondition_fails(run):
    run("set", "c", "1")
    revision = json.loads(run("get", "c", "-o", "json")[1])["revision"]
    code, out, err = run("set", "c", "2", "--if-match", str(revision + 1000))
    assert code == 3 and "precondition failed" in one_line(err)
    assert run("get", "c")[1] == "1\n"
    code, out, _ = run("set", "c", "2", "--if-match", str(revision), "-o", "json")
    assert code == 0 and json.loads(out)["revision"] > revision
    assert run("set", "c", "3", "--if-absent")[0] == 3
    assert run("set", "fresh", "3", "--if-absent")[0] == 0
    assert run("get", "c")[1] == "2\n"


def test_del_deletes_and_del_of_an_absent_key_is_ok(run):
    run("set", "gone", "1")
    assert run("del", "gone") == (0, "", "")
    assert run("get", "gone")[0] == 1
    assert run("del", "gone")[0] == 0
    run("set", "kept", "1")
    assert run("del", "kept", "--if-match", "999999")[0] == 3
    assert run("get", "kept")[0] == 0


def test_keys_with_slashes_percent_and_non_ascii_round_trip(run):
    for key in ["a/b", "100%", "x y", "ключ/日本", "//"]:
        assert run("set", key, json.dumps(key))[0] == 0
        assert run("get", key)[1] == key + "\n"


def test_bad_input_from_the_server_exits_2(run):
    code, _, err = run("set", "k", "1", "--ttl", "-5")
    assert code == 2 and "400" in one_line(err)


def test_usage_errors_exit_2_with_one_line(run, tmp_path):
    for argv in [
        (),
        ("get",),
        ("frobnicate",),
        ("set", "k", "1", "--ttl", "5", "--expiry", "9"),
        ("set", "k", "1", "--ttl", "soon"),
        ("--url", "localhost:8080", "get", "k"),
        ("--url", "https://127.0.0.1:9", "--ca", str(tmp_path / "none.pem"), "get", "k"),
        ("--token-file", str(tmp_path / "no-token"), "get", "k"),
    ]:
        code, out, err = run(*argv)
        assert (code, out) == (2, ""), argv
        one_line(err)


def test_health_prints_the_status_and_its_checks(run):
    code, out, _ = run("health")
    assert code == 0 and out.splitlines()[0] == "pass"
    assert any(line.startswith("engine") for line in out.splitlines())
    code, out, _ = run("health", "-o", "json")
    assert code == 0 and json.loads(out)["status"] == "pass"


def test_no_server_exits_4_with_one_line(run):
    code, out, err = run("--url", "http://127.0.0.1:9", "get", "k")
    assert code == 4 and out == ""
    assert "127.0.0.1:9" in one_line(err)
    # a watch retries, then gives up
    code, out, err = run("--url", "http://127.0.0.1:9", "watch", "--give-up-after", "0.3")
    assert code == 4 and out == ""
    assert "watch: ConnectError" in one_line(err)


# -- access control, Unix sockets, TLS


def test_tokens_from_the_option_env_and_a_file(dache_process, run, monkeypatch, tmp_path):
    node = dache_process(env={"AUTH_TOKEN": "s3cret-write", "AUTH_READ_TOKEN": "s3cret-read"})
    monkeypatch.setenv("DACHE_URL", f"http://127.0.0.1:{node.port}")
    code, _, err = run("get", "k")
    assert code == 4 and "401" in one_line(err)
    assert "s3cret" not in err
    assert run("--token", "s3cret-write", "set", "k", "1")[0] == 0
    monkeypatch.setenv("DACHE_TOKEN", "s3cret-read")
    assert run("get", "k") == (0, "1\n", "")
    code, _, err = run("set", "k", "2")
    assert code == 4 and "403" in one_line(err)
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-write\n")
    monkeypatch.delenv("DACHE_TOKEN")
    monkeypatch.setenv("DACHE_TOKEN_FILE", str(token_file))
    assert run("set", "k", "3")[0] == 0
    assert run("get", "k")[1] == "3\n"


def test_a_unix_socket_url(dache_process, run, tmp_path):
    sock = tmp_path / "dache.sock"
    node = dache_process(
        env={"DURABILITY_ENGINE": "memory"}, args=[f"--listen=unix:{sock}"], wait=False
    )
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert node.proc.poll() is None and time.monotonic() < deadline, node.output()
        time.sleep(0.05)
    url = f"unix:{sock}"
    assert run("--url", url, "set", "over", '"a socket"')[0] == 0
    assert run("--url", url, "get", "over") == (0, "a socket\n", "")


def test_tls_with_a_ca_option(dache_process, run, certificate):  # noqa: F811
    node = dache_process(
        env={"DURABILITY_ENGINE": "memory"}, args=[f"--listen={tls_listen(certificate)}"]
    )
    url = f"https://127.0.0.1:{node.port}"
    code, _, err = run("--url", url, "get", "k")
    assert code == 4 and "CERTIFICATE_VERIFY_FAILED" in one_line(err)
    assert run("--url", url, "--ca", certificate[1], "set", "k", '"tls"')[0] == 0
    assert run("--url", url, "--ca", certificate[1], "get", "k")[1] == "tls\n"


# -- the client library


def test_the_client_raises_one_exception_class_per_error(node):
    with dc.Client(f"http://127.0.0.1:{node.port}") as client:
        revision = client.set("lib", {"a": [1, 2]})
        entry = client.get("lib")
        assert entry == dc.Entry("lib", {"a": [1, 2]}, None, revision)
        with pytest.raises(dc.NotFound):
            client.get("lib/missing")
        with pytest.raises(dc.PreconditionFailed) as failed:
            client.set("lib", 1, if_match=revision + 1000)
        assert failed.value.status == 412
        with pytest.raises(dc.BadRequest):
            client.set("lib", 1, ttl=-1)
        client.delete("lib", if_match=revision)
        with pytest.raises(dc.NotFound):
            client.get("lib")
    with dc.Client("http://127.0.0.1:9") as nowhere:
        with pytest.raises(dc.Unavailable):
            nowhere.get("k")


def test_a_node_at_its_memory_bound_is_out_of_memory_and_exit_4(dache_process, run, monkeypatch):
    node = dache_process(env={"DURABILITY_ENGINE": "memory", "MAX_MEMORY": "1mb"})
    with dc.Client(f"http://127.0.0.1:{node.port}") as client:
        with pytest.raises(dc.OutOfMemory) as full:
            for i in range(100):
                client.set(f"big/{i}", "x" * 50_000)
        assert full.value.status == 507 and isinstance(full.value, dc.ServerError)
        assert client.get("big/0").value == "x" * 50_000  # reads are never refused
    monkeypatch.setenv("DACHE_URL", f"http://127.0.0.1:{node.port}")
    code, _, err = run("set", "big/more", json.dumps("x" * 50_000))
    assert code == 4 and one_line(err).startswith("dachectl: 507:")


# -- the installed command


def test_the_console_script_and_python_m_work(node):
    env = {**os.environ, "DACHE_URL": f"http://127.0.0.1:{node.port}"}
    done = subprocess.run(
        [DACHECTL, "set", "script", "[1, 2]"], env=env, capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "dache.ctl", "get", "nothing-here"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr == "dachectl: 404: key not found\n"


def test_pip_install_gives_dachectl_and_the_console_files(node, tmp_path):
    """`pip install .` (into a target folder, dependencies left to this venv)."""
    source = tmp_path / "source"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", "dache-data", "docs"
        ),
    )
    target = tmp_path / "installed"
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--quiet"]
    done = subprocess.run(
        [*pip, "--target", str(target), str(source)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    env = {**os.environ, "PYTHONPATH": str(target), "DACHE_URL": f"http://127.0.0.1:{node.port}"}
    done = subprocess.run(
        [str(target / "bin" / "dachectl"), "set", "installed", "true"],
        env=env,
        cwd=tmp_path,  # not the checkout: its dache/ would be imported first
        timeout=60,
    )
    assert done.returncode == 0
    assert node.get("installed")[1]["value"] is True
    probe = (
        "import dache.ctl; from importlib.resources import files; "
        "print(dache.ctl.__file__); "
        "print(all(files('dache.web').joinpath('console', name).is_file() "
        "for name in ('index.html', 'app.js', 'style.css')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    where, shipped = done.stdout.split()
    assert where.startswith(str(target)) and shipped == "True", done.stderr


# -- the key space (issue 12's routes: list, range delete, batch, PATCH)


def test_ls_pages_through_every_key_under_a_prefix_in_order(run):
    keys = [f"ls/{i:03d}" for i in range(25)] + ["ls/é", "ls/日本"]
    ops = [{"op": "set", "key": key, "value": i} for i, key in enumerate(keys)]
    assert run("batch", "-", stdin=json.dumps({"ops": ops}))[0] == 0
    run("set", "lsx", "1")
    code, out, _ = run("ls", "ls/", "--page", "4")
    assert code == 0 and out.splitlines() == sorted(keys)
    code, out, _ = run("ls", "ls/", "--values", "-o", "json", "--page", "7")
    listed = [json.loads(line) for line in out.splitlines()]
    assert [(e["key"], e["value"]) for e in listed] == sorted(
        (key, i) for i, key in enumerate(keys)
    )
    assert run("ls", "ls/", "--count") == (0, "27\n", "")


def test_rm_asks_unless_yes_and_deletes_the_prefix(run, node):
    for i in range(5):
        run("set", f"rm/{i}", str(i))
    run("set", "rmkeep", "1")
    code, _, err = run("rm", "--prefix", "rm/", stdin="")
    assert code == 2 and "--yes" in one_line(err)
    assert run("ls", "rm/", "--count")[1] == "5\n"
    # on a terminal it asks, with the count; anything but y/yes deletes nothing
    env = {**os.environ, "DACHE_URL": f"http://127.0.0.1:{node.port}"}
    rm = [DACHECTL, "rm", "--prefix"]
    code, _, shown = run_in_terminal([*rm, "rm/"], env, answer=("[y/N] ", "n\n"))
    assert code == 0 and "delete 5 keys under 'rm/'? [y/N] n" in shown, shown
    assert shown.splitlines()[-1] == "nothing deleted"
    assert run("ls", "rm/", "--count")[1] == "5\n"
    code, _, shown = run_in_terminal([*rm, "rm/3"], env, answer=("[y/N] ", "yes\n"))
    assert code == 0 and shown.splitlines()[-1] == "deleted 1", shown
    assert run("rm", "--prefix", "rm/", "--yes", "-o", "json") == (0, '{"deleted": 4}\n', "")
    assert run("ls", "rm", "--count")[1] == "1\n"


def test_batch_is_atomic_and_a_failed_precondition_exits_3(run, tmp_path):
    run("set", "b/x", "1")
    ops = {
        "ops": [
            {"op": "set", "key": "b/y", "value": "new"},
            {"op": "set", "key": "b/x", "value": 2, "if_none_match": True},
        ]
    }
    code, _, err = run("batch", "-", stdin=json.dumps(ops))
    assert code == 3 and "412" in one_line(err)
    assert run("get", "b/y")[0] == 1  # nothing applied
    path = tmp_path / "ops.json"
    ops["ops"][1] = {"op": "get", "key": "b/x"}
    path.write_text(json.dumps(ops))
    code, out, _ = run("batch", str(path))
    results = json.loads(out)["results"]
    assert code == 0 and isinstance(results[0], int) and results[1]["value"] == 1
    assert run("batch", str(tmp_path / "missing.json"))[0] == 2
    assert run("batch", "-", stdin="{not json")[0] == 2


def test_patch_touches_and_increments(run):
    code, out, _ = run("patch", "p/n", "--increment", "5")
    assert (code, out) == (0, "5\n")
    assert run("patch", "p/n", "--increment", "-2")[1] == "3\n"
    code, out, _ = run("patch", "p/n", "--ttl", "600", "-o", "json")
    assert code == 0 and json.loads(out)["expiry"] > time.time() + 500
    assert "expiry" not in json.loads(run("patch", "p/n", "--persist", "-o", "json")[1])
    run("set", "p/s", '"text"')
    code, _, err = run("patch", "p/s", "--increment", "1")
    assert code == 3 and "409" in one_line(err)
    assert run("patch", "p/absent", "--ttl", "5")[0] == 1
    assert run("patch", "p/n")[0] == 2


def test_export_then_import_round_trip_with_a_progress_bar_only_on_a_terminal(node, tmp_path):
    env = {**os.environ, "DACHE_URL": f"http://127.0.0.1:{node.port}"}
    env.pop("DACHE_TOKEN", None)
    lines = [json.dumps({"key": f"io/{i:04d}", "value": {"i": i}}) for i in range(1200)]
    lines.append(json.dumps({"key": "io/expiring", "value": 1, "expiry": time.time() + 900}))
    imported = subprocess.run(
        [DACHECTL, "import", "-", "--batch-size", "500"],
        input="\n".join(lines) + "\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout == "imported 1201 keys\n" and imported.stderr == ""  # no bar
    exported = subprocess.run(
        [DACHECTL, "export", "io/"], env=env, capture_output=True, text=True, timeout=60
    )
    assert exported.returncode == 0 and exported.stderr == ""
    docs = [json.loads(line) for line in exported.stdout.splitlines()]
    assert len(docs) == 1201
    assert docs[0] == {"key": "io/0000", "value": {"i": 0}}
    assert docs[-1]["key"] == "io/expiring" and docs[-1]["expiry"] > time.time()
    # on a terminal, the same import draws its bar (on stderr), then the same summary
    source = tmp_path / "io.jsonl"
    source.write_text("\n".join(lines) + "\n")
    code, raw, shown = run_in_terminal([DACHECTL, "import", str(source)], env)
    assert code == 0, raw
    assert "\r" in raw and "import: " in raw and "1201 keys" in raw  # tqdm's redraws
    assert shown.splitlines()[-1] == "imported 1201 keys"
    code, raw, _ = run_in_terminal([DACHECTL, "export", "io/"], env)
    assert code == 0 and "export: 100%" in raw and "1201/1201" in raw
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"key": "io/ok", "value": 1}\n[1, 2]\n')
    code = subprocess.run([DACHECTL, "import", str(bad)], env=env, capture_output=True, text=True)
    assert code.returncode == 2 and f"{bad}:2:" in code.stderr


# -- watch (issue 13's stream)


def _watch_lines(node, *argv, count, timeout=30.0):
    """The first `count` lines `dachectl watch` prints (then it is stopped)."""
    env = {**os.environ, "DACHE_URL": f"http://127.0.0.1:{node.port}"}
    watcher = subprocess.Popen(
        [DACHECTL, "watch", *argv], env=env, stdout=subprocess.PIPE, text=True
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(_take(watcher.stdout, count)))
    reader.start()
    return watcher, reader, lines


def _take(stream, count):
    for _ in range(count):
        line = stream.readline()
        if not line:
            return
        yield line.rstrip("\n")


def test_watch_prints_one_line_per_change_under_the_prefix(node):
    base = node.set("w/seed", 0) and int(node.request("GET", "/dache/w/seed")[1]["ETag"].strip('"'))
    watcher, reader, lines = _watch_lines(node, "w/", "--since", str(base), count=3)
    try:
        assert node.set("w/a", {"n": 1}) == 204
        assert node.set("elsewhere", 1) == 204
        assert node.delete("w/a") == 204
        assert node.set("w/b", "x") == 204
        reader.join(30)
        assert [line.split("\t")[1:] for line in lines] == [
            ["set", "w/a", '{"n": 1}'],
            ["delete", "w/a"],
            ["set", "w/b", "x"],
        ]
        revisions = [int(line.split("\t")[0]) for line in lines]
        assert revisions == sorted(revisions) and revisions[0] > base
    finally:
        watcher.kill()
        watcher.wait(10)


def test_the_client_watch_resumes_across_a_server_restart(dache_process, tmp_path):
    data = str(tmp_path / "restart-data")
    first = dache_process(env={"DISK_PATH": data}, args=["--listen=tcp:0:interface=127.0.0.1"])
    port = first.port
    seen: list[dc.Event] = []
    client = dc.Client(f"http://127.0.0.1:{port}")

    def follow():
        for event in client.watch("r/", since=0, retry=0.2, give_up_after=30):
            seen.append(event)
            if event.key == "r/after":
                return

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    assert first.set("r/before", 1) == 204
    deadline = time.monotonic() + 30
    while not any(e.key == "r/before" for e in seen):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert first.terminate() == 0
    second = dache_process(
        env={"DISK_PATH": data}, args=[f"--listen=tcp:{port}:interface=127.0.0.1"]
    )
    assert second.set("r/after", 2) == 204
    thread.join(30)
    client.close()
    keys = [e.key for e in seen if e.kind == "set"]
    assert keys.count("r/before") == 1 and keys[-1] == "r/after"
