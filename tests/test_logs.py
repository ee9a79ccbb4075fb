"""
LOG_FORMAT=json: every line a JSON object carrying the event's fields; start-up
lines name the engine, the listen address, the entries loaded and the load time.
"""

from __future__ import annotations

import json
import time
from typing import Any

from twisted.application.service import Application
from twisted.logger import ILogObserver, Logger
from twisted.python.failure import Failure

from dache.logs import event_as_json_line, observer_for_twistd, offer_observer


def logged(emit: Any) -> dict[str, Any]:
    """The one event `emit(logger)` logs."""
    events: list[dict[str, Any]] = []
    emit(Logger(namespace="dache.test", observer=events.append))
    (event,) = events
    return event


def test_an_event_becomes_one_json_line_with_its_fields() -> None:
    event = logged(
        lambda log: log.info("loaded {entries} entries in {load_seconds:.3f}s", entries=3,
                             load_seconds=0.0123, note="two\nlines")
    )  # fmt: skip
    line = event_as_json_line(event)
    assert line.endswith("\n") and line.count("\n") == 1
    record = json.loads(line)
    assert record["message"] == "loaded 3 entries in 0.012s"
    assert (record["level"], record["namespace"]) == ("info", "dache.test")
    assert record["time"].endswith("Z") and "T" in record["time"]
    assert (record["entries"], record["load_seconds"], record["note"]) == (3, 0.0123, "two\nlines")
    assert not [key for key in record if key.startswith("log_")]


def test_a_failure_carries_its_error_and_traceback() -> None:
    try:
        raise ValueError("bad thing")
    except ValueError:
        failure = Failure()
    event = logged(lambda log: log.failure("while {doing}", failure, doing="testing"))
    record = json.loads(event_as_json_line(event))
    assert (record["level"], record["message"]) == ("critical", "while testing")
    assert record["error"] == "bad thing"
    assert "ValueError: bad thing" in record["traceback"]


def test_fields_json_cannot_hold_become_text() -> None:
    loop: list[Any] = []
    loop.append(loop)
    record = json.loads(event_as_json_line(logged(lambda log: log.warn("x", thing=object()))))
    assert record["thing"].startswith("<object object")
    record = json.loads(event_as_json_line(logged(lambda log: log.warn("y {loop}", loop=loop))))
    assert record["message"] == "y [[...]]"  # the line survives without the field


def test_twistd_gets_the_observer_only_for_json(tmp_path: Any) -> None:
    nodaemon = {"nodaemon": True, "logfile": None, "logger": None, "syslog": False}
    assert observer_for_twistd("text", nodaemon) is None
    assert observer_for_twistd("json", None) is None  # not run by twistd
    assert observer_for_twistd("json", {**nodaemon, "logger": print}) is None
    assert observer_for_twistd("json", {**nodaemon, "syslog": True}) is None
    assert observer_for_twistd("json", nodaemon) is not None

    path = tmp_path / "dache.log"
    observer = observer_for_twistd("json", {**nodaemon, "logfile": str(path)})
    event = logged(lambda log: log.info("hello {who}", who="file"))
    observer(event)
    observer(event)
    lines = path.read_text().splitlines()
    assert [json.loads(line)["who"] for line in lines] == ["file", "file"]

    application = Application("dache")
    offer_observer(application, observer)
    assert application.getComponent(ILogObserver) is observer


def test_text_leaves_twistd_its_own_observer() -> None:
    application = Application("dache")
    offer_observer(application, None)
    assert application.getComponent(ILogObserver) is None


def wait_for_line(process: Any, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in line for line in list(process.lines)):
        assert time.monotonic() < deadline, f"no line with {text!r}:\n{process.output()}"
        time.sleep(0.02)


def test_twistd_logs_json_lines_under_log_format_json(dache_process: Any) -> None:
    process = dache_process(env={"LOG_FORMAT": "json"})
    assert process.set("k", 1) == 204
    process.terminate()  # twistd re-raises SIGTERM on its way out: the status is -15
    wait_for_line(process, "Server Shut Down.")

    records = process.json_lines()  # every line parses
    assert all({"time", "level", "namespace", "message"} <= set(r) for r in records)

    def one(field: str) -> dict[str, Any]:
        (record,) = [r for r in records if field in r]
        return record

    assert one("engine")["engine"] == "disk"  # the default
    assert one("address")["address"] == f"tcp:127.0.0.1:{process.port}"
    loaded = one("entries")
    assert loaded["entries"] == 0 and loaded["load_seconds"] >= 0
    assert loaded["namespace"] == "dache.service.DacheService"
    assert any(r["message"] == "dache stopped" for r in records)


def test_the_option_twin_and_the_default(dache_process: Any) -> None:
    process = dache_process(args=["--log-format=json"])
    assert all(isinstance(r, dict) for r in process.json_lines())
    text = dache_process()
    assert any("listening on" in line and not line.startswith("{") for line in text.lines)
