"""
The web console (/ui) in a real headless Chromium (Debian's chromium and
chromium-driver, installed with apt-get by tests/debian.py when missing) against
a live `twistd dache` with access control: the token prompt, create, edit with
a conflicting concurrent write (the conflict is shown, nothing overwritten),
live updates without a reload, delete, and browsing pages by prefix.

CONSOLE_SCREENSHOTS=<dir> saves the main views there (docs/ holds the README's).
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shlex
import shutil
import tempfile
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from tests import debian
from tests.process import DacheProcess
from tests.terminal import run_in_terminal
from tests.test_ctl import DACHECTL

TOKEN = "console-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WAIT = 30  # seconds: the machine is shared


@pytest.fixture(scope="module")
def node():
    process = DacheProcess({"DURABILITY_ENGINE": "memory", "AUTH_TOKEN": TOKEN}).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def browser():
    debian.ensure("chromium", lambda: shutil.which("chromium") is not None)
    debian.ensure("chromium-driver", lambda: shutil.which("chromedriver") is not None)
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    profile = tempfile.mkdtemp(prefix="dache-chromium-")
    for flag in (
        "--headless",
        "--no-sandbox",  # the suite runs as root
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1200,800",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def put(node, key, value, **fields):
    body = json.dumps({"value": value, **fields}).encode()
    status, headers, _ = node.request("PUT", "/dache/" + key, body, AUTH)
    assert status == 204
    return headers["ETag"]


def stored(node, key):
    status, _, body = node.request("GET", "/dache/" + key, headers=AUTH)
    return status, (json.loads(body)["value"] if status == 200 else None)


def visible(driver, element_id):
    return WebDriverWait(driver, WAIT).until(ec.visibility_of_element_located((By.ID, element_id)))


def text_in(driver, element_id, text):
    try:
        WebDriverWait(driver, WAIT).until(
            ec.text_to_be_present_in_element((By.ID, element_id), text)
        )
    except TimeoutException:
        shown = driver.find_element(By.ID, element_id).text
        logs = driver.get_log("browser")
        raise AssertionError(f"#{element_id} shows {shown!r}, not {text!r}; console: {logs}")


def typed(driver, element_id, text):
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(text)


def screenshot(driver, name, tmp_path, prefix="console-"):
    folder = Path(os.environ.get("CONSOLE_SCREENSHOTS") or tmp_path)
    assert driver.save_screenshot(str(folder / f"{prefix}{name}.png"))


def test_token_create_conflict_live_update_delete(browser, node, tmp_path):
    put(node, "console/seen", {"hello": "world"})
    browser.get(f"http://127.0.0.1:{node.port}/ui")  # redirected to /ui/
    visible(browser, "token-panel")
    assert browser.execute_script("return sessionStorage.getItem('dacheToken')") is None
    typed(browser, "token", TOKEN)
    browser.find_element(By.CSS_SELECTOR, "#token-form button").click()
    text_in(browser, "health", "pass")
    text_in(browser, "live", "live: watch")  # following the watch stream, not polling
    assert browser.execute_script("return sessionStorage.getItem('dacheToken')") == TOKEN
    assert browser.execute_script("return localStorage.length") == 0
    assert not browser.get_cookies()

    # create, with a ttl: the entry view shows it pretty-printed, its ETag and the countdown
    browser.find_element(By.ID, "new-key").click()
    visible(browser, "editor")
    typed(browser, "editor-key", "console/ada")
    typed(browser, "editor-value", '{"name": "Ada", "langs": ["en", "fr"]}')
    typed(browser, "editor-ttl", "3600")
    browser.find_element(By.CSS_SELECTOR, "#editor-form button[type=submit]").click()
    text_in(browser, "message", 'saved "console/ada"')
    assert stored(node, "console/ada") == (200, {"name": "Ada", "langs": ["en", "fr"]})
    value = browser.find_element(By.ID, "entry-value").text
    assert json.loads(value) == {"name": "Ada", "langs": ["en", "fr"]} and "\n" in value
    expiry = browser.find_element(By.ID, "entry-expiry").text
    assert "UTC" in expiry and "(in 59m" in expiry or "(in 1h" in expiry
    assert browser.find_element(By.ID, "entry-etag").text.startswith('"')
    text_in(browser, "metrics-text", "2 entries")  # sampled from /metrics every 2 s
    text_in(browser, "metrics-text", "MiB (no limit)")  # this node has no memory bound
    screenshot(browser, "entry", tmp_path)

    # edit while someone else writes: the conflict is shown, nothing overwritten
    browser.find_element(By.ID, "edit").click()
    visible(browser, "editor")
    put(node, "console/ada", {"name": "Ada Lovelace"})
    typed(browser, "editor-value", '{"name": "mine"}')
    browser.find_element(By.CSS_SELECTOR, "#editor-form button[type=submit]").click()
    visible(browser, "conflict")
    text_in(browser, "conflict-value", "Ada Lovelace")
    assert stored(node, "console/ada") == (200, {"name": "Ada Lovelace"})
    screenshot(browser, "conflict", tmp_path)
    browser.find_element(By.ID, "conflict-overwrite").click()
    text_in(browser, "message", "saved")
    assert stored(node, "console/ada") == (200, {"name": "mine"})

    # a change made elsewhere appears without a reload
    marker = browser.execute_script("window.notReloaded = true; return 1")
    put(node, "console/ada", {"name": "changed elsewhere"})
    text_in(browser, "entry-value", "changed elsewhere")
    assert browser.execute_script("return window.notReloaded") is True and marker == 1

    # delete (with If-Match), after confirming
    browser.find_element(By.ID, "delete").click()
    WebDriverWait(browser, WAIT).until(ec.alert_is_present()).accept()
    text_in(browser, "message", 'deleted "console/ada"')
    assert stored(node, "console/ada") == (404, None)
    assert stored(node, "console/seen")[0] == 200


def test_memory_used_vs_the_limit_from_the_memory_bound_metrics(browser, node):
    """The names the memory bound (issue 11) exports; a node without it shows no limit."""
    browser.get(f"http://127.0.0.1:{node.port}/ui/")
    visible(browser, "browser")
    exposition = (
        "# TYPE dache_memory_used_bytes gauge\ndache_memory_used_bytes 3.145728e+06\n"
        "# TYPE dache_memory_limit_bytes gauge\ndache_memory_limit_bytes 1.048576e+07\n"
        'dache_bytes{note="older nodes"} 99.0\n'
    )

    def shown(text):
        return browser.execute_script(
            "const t = arguments[0];"
            "return memoryText({bytes: metric(t, 'dache_memory_used_bytes') ??"
            " metric(t, 'dache_bytes'), limit: metric(t, 'dache_memory_limit_bytes')})",
            text,
        )

    assert shown(exposition) == "3.00 of 10.00 MiB"
    assert shown(exposition.replace("1.048576e+07", "0.0")) == "3.00 MiB (no limit)"
    older = 'dache_bytes{note="older nodes"} 2097152.0\n'
    assert shown(older) == "2.00 MiB (no limit)"


def test_the_console_needs_no_token_and_ui_false_turns_it_off(node, dache_process):
    status, headers, body = node.request("GET", "/ui/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    assert b'<script src="app.js"></script>' in body
    assert node.request("GET", "/ui/app.js")[0] == 200
    put(node, "secret", "data")
    status, _, body = node.request("GET", "/ui/../dache/secret")
    assert status == 404 and b"data" not in body  # not a way around the token
    status, _, body = node.request("GET", "/ui/nothing.js")
    assert status == 404 and json.loads(body) == {"error": "no such file"}
    off = dache_process(env={"DURABILITY_ENGINE": "memory"}, args=["--ui", "false"])
    status, _, body = off.request("GET", "/ui/")
    assert status == 404 and "UI" in json.loads(body)["error"]


def test_browse_by_prefix_with_paging(browser, node, tmp_path):
    for i in range(45):
        put(node, f"shop/item{i:02d}", {"price": i, "name": f"item {i}"})
    put(node, "shopping", 1)
    browser.get(f"http://127.0.0.1:{node.port}/ui/")  # the token is kept for the tab
    text_in(browser, "health", "pass")
    typed(browser, "prefix", "shop/")
    browser.find_element(By.CSS_SELECTOR, "#prefix-form button[type=submit]").click()

    def rows():
        """(key, value shown, changed?) per row, read in one go (the list re-renders)."""
        return browser.execute_script(
            "return [...document.querySelectorAll('#keys tbody tr')].map((r) =>"
            " [r.dataset.key, r.cells[1].textContent, r.classList.contains('changed')])"
        )

    def keys():
        return [row[0] for row in rows()]

    WebDriverWait(browser, WAIT).until(lambda _: keys()[:1] == ["shop/item00"])
    assert keys() == [f"shop/item{i:02d}" for i in range(20)]
    screenshot(browser, "browse", tmp_path)
    browser.find_element(By.ID, "next").click()
    WebDriverWait(browser, WAIT).until(lambda _: keys()[:1] == ["shop/item20"])
    browser.find_element(By.ID, "next").click()
    WebDriverWait(browser, WAIT).until(lambda _: keys() == [f"shop/item{i}" for i in range(40, 45)])
    assert browser.find_element(By.ID, "next").get_attribute("disabled") is not None
    browser.find_element(By.ID, "prev").click()
    WebDriverWait(browser, WAIT).until(lambda _: keys()[:1] == ["shop/item20"])
    # a new key on this page appears without a reload
    put(node, "shop/item20a", "new")
    WebDriverWait(browser, WAIT).until(lambda _: "shop/item20a" in keys())
    shown = {key: (value, changed) for key, value, changed in rows()}
    assert shown["shop/item20a"] == ('"new"', True)  # marked as changed
    assert shown["shop/item20"] == ('{"price":20,"name":"item 20"}', False)  # JSON.stringify
    assert keys()[:2] == ["shop/item20", "shop/item20a"] and len(keys()) == 20


# -- the README's "Command line" screenshot: a real dachectl session on a terminal

SESSION = [  # (what is typed, the exit code expected)
    ("""dachectl set user/42 '{"name": "Ada"}' --ttl 3600""", 0),
    ("dachectl get user/42", 0),
    ("dachectl -o json get user/42", 0),
    ("""dachectl set user/42 '"Bob"' --if-absent""", 3),
    ("dachectl get user/7", 1),
    ("dachectl patch visits --increment 1", 0),
    ("dachectl import users.jsonl", 0),
    ("dachectl ls user/ --count", 0),
    ("dachectl ls user/1 --values", 0),
    ("dachectl health", 0),
]


def test_a_dachectl_session_on_a_terminal(browser, node, tmp_path):
    users = tmp_path / "users.jsonl"
    docs = [{"key": f"user/{i}", "value": {"n": i}} for i in range(1000, 1003)]
    docs += [{"key": f"user/x{i:04d}", "value": i} for i in range(2000)]
    users.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    env = {**os.environ, "DACHE_URL": f"http://127.0.0.1:{node.port}", "DACHE_TOKEN": TOKEN}
    shown = ["$ export DACHE_URL=http://127.0.0.1:8080 DACHE_TOKEN_FILE=~/.dache-token"]
    for line, expected in SESSION:
        argv = [str(users) if a == users.name else a for a in shlex.split(line)[1:]]
        code, raw, screen = run_in_terminal([DACHECTL, *argv], env)
        assert code == expected, (line, raw)
        shown += [f"$ {line}", *screen.splitlines()]
        if code:
            shown.append(f"$ echo $?\n{code}")
    text = "\n".join(shown)
    assert TOKEN not in text
    assert '{"name": "Ada"}' in text and "dachectl: 412: precondition failed" in text
    assert "dachectl: 404: key not found" in text and "imported 2003 keys" in text
    assert "import: 2003 keys" in text  # tqdm's last redraw, on the terminal
    assert "\n2004\n" in text  # user/42 and the import
    assert 'user/1000\t{"n": 1000}' in text
    assert re.search(r"\ncache:entries: pass, \d+\n", text)  # the token shows health's detail
    page = (
        "<!doctype html><meta charset=utf-8><body style='margin:0;background:#1e1e1e'>"
        "<pre style='margin:0;padding:14px 18px;color:#d4d4d4;font:14px/1.35 monospace;"
        "white-space:pre-wrap'>"
        + "\n".join(
            f"<b style='color:#7ec699'>{html.escape(line)}</b>"
            if line.startswith("$ ")
            else html.escape(line)
            for line in text.splitlines()
        )
        + "</pre>"
    )
    browser.get("data:text/html;base64," + base64.b64encode(page.encode()).decode())
    screenshot(browser, "dachectl", tmp_path, prefix="")
