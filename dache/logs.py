"""
LOG_FORMAT=json: one JSON object per line, for log shippers.

    {"time": "2025-01-01T12:00:00.000Z", "level": "info",
     "namespace": "dache.service.DacheService",
     "message": "loaded 3 entries in 0.002s", "entries": 3, "load_seconds": 0.0021}

Every line has time (UTC, ISO 8601), level, namespace and message (the event's
text, exactly as the text format shows it); the event's own fields follow
(engine, address, entries, ...), and a logged failure adds "error" and
"traceback". twisted.logger's own jsonFileLogObserver is not used because its
lines are meant to be read back by Twisted: record separators, and levels and
loggers serialised as Twisted objects.

How twistd uses it: twistd chooses its log observer after makeService, asking
the application for an ILogObserver component first (as a .tac file would set
one). So dache.tap builds the observer and DacheService, when twistd adds it to
the application, offers it there (`offer_observer`). An explicit
`twistd --logger` still wins, and `--syslog` is left alone.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import FileLogObserver, ILogObserver, formatEvent
from twisted.python import logfile

# Keys of old-style (twisted.python.log) events that the fields above already cover.
LEGACY_KEYS = frozenset(
    ("message", "format", "time", "isError", "system", "why", "failure", "printed", "logLevel")
)


def _fallback(value: Any) -> str:
    return str(value)


def event_as_json_line(event: dict[str, Any]) -> str:
    """One log event as one line of JSON, newline-terminated."""
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": _iso(event.get("log_time")),
        "level": level.name if level is not None else None,
        "namespace": event.get("log_namespace"),
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in LEGACY_KEYS or key in record:
            continue
        record[key] = value
    failure = event.get("log_failure")
    if failure is not None:
        record["error"] = failure.getErrorMessage()
        record["traceback"] = failure.getTraceback()
    try:
        return json.dumps(record, default=_fallback) + "\n"
    except ValueError:  # e.g. a circular structure: keep the line, lose the fields
        core = {k: record[k] for k in ("time", "level", "namespace", "message")}
        return json.dumps(core, default=_fallback) + "\n"


def _iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def json_observer(out: IO[Any]) -> FileLogObserver:
    return FileLogObserver(out, event_as_json_line)


def observer_for_twistd(log_format: str, twistd_options: Any) -> ILogObserver | None:
    """
    The observer twistd should log through for LOG_FORMAT, or None to keep
    twistd's own choice (text format, --logger, --syslog). Writes where twistd
    would: stdout under -n unless --logfile says otherwise, else the log file.
    """
    if log_format != "json" or twistd_options is None:
        return None
    options = dict(twistd_options.items()) if hasattr(twistd_options, "items") else {}
    if options.get("logger") or options.get("syslog"):
        return None
    filename = options.get("logfile")
    if filename == "-" or (options.get("nodaemon") and not filename):
        # The real stdout, captured now: twistd later replaces sys.stdout with
        # a file that logs, which must not be where the log goes.
        return json_observer(sys.stdout)
    return json_observer(logfile.LogFile.fromFullPath(filename or "twistd.log"))


def offer_observer(application: Any, observer: ILogObserver | None) -> None:
    """Make `observer` the log observer twistd starts for `application`."""
    if observer is not None and hasattr(application, "setComponent"):
        application.setComponent(ILogObserver, observer)
