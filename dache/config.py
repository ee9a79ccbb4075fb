"""
dache's configuration: one table of settings, read from environment variables
(the original dache's names) and overridden by `twistd dache --option` twins.

Every setting is declared once in SETTINGS; the twistd Options class, the
--help text and the README table all come from it. A bad value raises
ConfigError with one line that names the setting and what it accepts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.python import usage

from dache.engines import REGISTRY
from dache.engines.pg_schema import parse_table_name
from dache.errors import ConfigError
from dache.store.eviction import POLICIES as EVICTION_POLICIES


@dataclass(frozen=True)
class Setting:
    env: str  # environment variable, e.g. "PORT"
    option: str  # twistd option, e.g. "port"
    default: str | None  # as a string, parsed like a user's value; None: unset
    parse: Callable[[str], Any]  # raises ValueError("must be ...") on bad input
    help: str
    secret: bool = False  # never echoed in errors or logs

    @property
    def attr(self) -> str:
        return self.env.lower()


# -- parsers: each raises ValueError with the "must be ..." half of a message


def parse_port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise ValueError("must be an integer from 0 to 65535")
    return port


def parse_ports(text: str) -> str:
    """One port, or a comma-separated list (one per POSTGRES_HOST), as libpq takes them."""
    ports = [part.strip() for part in text.split(",")]
    for port in ports:
        try:
            parse_port(port)
        except ValueError:
            raise ValueError("must be a port from 0 to 65535, or a comma-separated list of them")
    return ",".join(ports)


def parse_hosts(text: str) -> str:
    """One host, or a comma-separated list (libpq tries them in order)."""
    hosts = [part.strip() for part in text.split(",")]
    if not all(hosts):
        raise ValueError("must be a host, or a comma-separated list of hosts without empty ones")
    return ",".join(hosts)


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be true or false")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError("must be a positive integer")
    return value


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise ValueError("must be a positive number of seconds")
    return value


def ratio_over_one(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 1 and math.isfinite(value)):
        raise ValueError("must be a number greater than 1")
    return value


def one_of(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError("must be one of: " + ", ".join(choices))
        return value

    return parse


_SIZE_SUFFIXES = {"": 1, "b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3, "tb": 1024**4}


def byte_size(text: str) -> int:
    """A size like 536870912, 512mb or 2gb (Redis's units, powers of 1024); 0 allowed."""
    cleaned = text.strip().lower()
    digits = cleaned.rstrip("kmgtb")
    suffix = cleaned[len(digits) :]
    if not digits.isdigit() or suffix not in _SIZE_SUFFIXES:
        raise ValueError("must be a number of bytes, optionally with kb, mb or gb (e.g. 512mb)")
    return int(digits) * _SIZE_SUFFIXES[suffix]


def plain_text(text: str) -> str:
    return text


def non_empty(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text


def bearer_token(text: str) -> str:
    # Empty is refused rather than read as "auth off": an unset variable
    # interpolated to "" must not silently open the cache.
    if not text:
        raise ValueError("must not be empty (unset it to turn access control off)")
    if not all("!" <= c <= "~" for c in text):
        raise ValueError("must be printable ASCII without spaces")
    return text


# Engine names accepted by DURABILITY_ENGINE: the registry in dache.engines.
ENGINE_NAMES = tuple(REGISTRY)

SETTINGS: list[Setting] = [
    Setting("PORT", "port", "8080", parse_port, "TCP port to serve on (all interfaces)."),
    Setting(
        "LISTEN",
        "listen",
        None,
        non_empty,
        "Twisted server endpoint to serve on, e.g. tcp:8080:interface=127.0.0.1, "
        "unix:/run/dache.sock, ssl:8443:privateKey=key.pem:certKey=cert.pem, "
        "systemd:domain=INET:index=0. Overrides PORT.",
    ),
    Setting(
        "DURABILITY_ENGINE",
        "durability-engine",
        "disk",
        one_of(*ENGINE_NAMES),
        "Where acknowledged writes are made durable: " + ", ".join(ENGINE_NAMES) + ".",
    ),
    # -- the postgres engine (checked by dache.engines.postgres when it is chosen)
    Setting(
        "POSTGRES_HOST",
        "postgres-host",
        None,
        parse_hosts,
        "PostgreSQL host name or address, or a Unix socket directory (postgres engine); "
        "several, comma-separated, for a primary and its standbys: dache writes to whichever "
        "accepts writes.",
    ),
    Setting(
        "POSTGRES_PORT",
        "postgres-port",
        "5432",
        parse_ports,
        "PostgreSQL port, or one per POSTGRES_HOST, comma-separated.",
    ),
    Setting("POSTGRES_DATABASE", "postgres-database", None, non_empty, "PostgreSQL database."),
    Setting("POSTGRES_USER", "postgres-user", None, non_empty, "PostgreSQL user."),
    Setting(
        "POSTGRES_PASSWORD",
        "postgres-password",
        None,
        plain_text,
        "PostgreSQL password; never logged. Prefer POSTGRES_PASSWORD_FILE.",
        secret=True,
    ),
    Setting(
        "POSTGRES_PASSWORD_FILE",
        "postgres-password-file",
        None,
        non_empty,
        "File holding the PostgreSQL password (e.g. a container secret); "
        "trailing newlines are ignored.",
    ),
    Setting(
        "POSTGRES_SSLMODE",
        "postgres-sslmode",
        None,
        one_of("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
        "libpq sslmode: disable, allow, prefer, require, verify-ca, verify-full "
        "(unset: libpq's default, prefer).",
    ),
    Setting(
        "POSTGRES_TABLE",
        "postgres-table",
        "dache",
        parse_table_name,
        "Table holding the entries, optionally schema-qualified; created if absent, "
        "migrated in place if it has dache 0.3.0's shape.",
    ),
    Setting(
        "POSTGRES_POOL_SIZE",
        "postgres-pool-size",
        "2",
        positive_int,
        "PostgreSQL connections; writes use one at a time, purges and health checks the rest.",
    ),
    Setting(
        "POSTGRES_CONNECT_TIMEOUT",
        "postgres-connect-timeout",
        "30",
        positive_seconds,
        "Seconds to keep retrying PostgreSQL at start-up before exiting with an error.",
    ),
    Setting(
        "POSTGRES_TOMBSTONE_RETENTION",
        "postgres-tombstone-retention",
        "3600",
        positive_seconds,
        "Seconds deletes stay readable by other nodes following the table; a node "
        "away for longer reloads the table when it is back.",
    ),
    Setting(
        "POSTGRES_PURGE_INTERVAL",
        "postgres-purge-interval",
        "30",
        positive_seconds,
        "Seconds between purges of expired rows and old tombstones (one node purges).",
    ),
    Setting(
        "DISK_PATH",
        "disk-path",
        "./dache-data",
        non_empty,
        "Directory of the disk engine's log (created if missing; one dache per directory).",
    ),
    Setting(
        "DISK_FSYNC",
        "disk-fsync",
        "always",
        one_of("always", "everysec", "no"),
        "When the disk engine fsyncs: always (before each 204), everysec, or no.",
    ),
    Setting(
        "DISK_COMPACT_RATIO",
        "disk-compact-ratio",
        "2",
        ratio_over_one,
        "Compact the disk log when it is this many times the size of the live data.",
    ),
    Setting(
        "DISK_COMPACT_MIN_BYTES",
        "disk-compact-min-bytes",
        "67108864",
        positive_int,
        "Never compact a disk log smaller than this many bytes.",
    ),
    Setting(
        "MAX_KEY_BYTES",
        "max-key-bytes",
        "1024",
        positive_int,
        "Longest key accepted, in UTF-8 bytes.",
    ),
    Setting(
        "MAX_VALUE_BYTES",
        "max-value-bytes",
        "1048576",
        positive_int,
        "Largest request body accepted, in bytes; larger bodies get 413 unread.",
    ),
    Setting(
        "WRITE_TIMEOUT",
        "write-timeout",
        "2",
        positive_seconds,
        "Seconds a set or delete waits for the engine before answering 503.",
    ),
    Setting(
        "WORKERS",
        "workers",
        "1",
        positive_int,
        "Processes serving the one listening socket, each a node of the cluster; "
        "more than 1 needs the postgres engine.",
    ),
    Setting(
        "ACCESS_LOG",
        "access-log",
        "false",
        parse_bool,
        "Log one line per request (costs throughput).",
    ),
    Setting(
        "LOGGING_REDACT_KEYS",
        "logging-redact-keys",
        "false",
        parse_bool,
        "Replace keys with a placeholder in access-log lines.",
    ),
    Setting(
        "LOG_FORMAT",
        "log-format",
        "text",
        one_of("text", "json"),
        "Log lines as human-readable text, or as one JSON object per line (for log shippers).",
    ),
    Setting(
        "METRICS",
        "metrics",
        "true",
        parse_bool,
        "Serve Prometheus metrics at /metrics and count requests for them.",
    ),
    Setting(
        "UI",
        "ui",
        "true",
        parse_bool,
        "Serve the web console at /ui; false turns it off (404).",
    ),
    Setting(
        "HEALTH_TIMEOUT",
        "health-timeout",
        "1",
        positive_seconds,
        "Seconds /health waits for the engine's round trip before reporting it down.",
    ),
    # -- access control and connection limits (dache/auth.py, dache/channel.py)
    Setting(
        "AUTH_TOKEN",
        "auth-token",
        None,
        bearer_token,
        "Bearer token that may read and write; when set, requests need "
        "'Authorization: Bearer <token>'. Prefer AUTH_TOKEN_FILE.",
        secret=True,
    ),
    Setting(
        "AUTH_TOKEN_FILE",
        "auth-token-file",
        None,
        non_empty,
        "File holding AUTH_TOKEN (surrounding whitespace is ignored).",
    ),
    Setting(
        "AUTH_READ_TOKEN",
        "auth-read-token",
        None,
        bearer_token,
        "Bearer token that may only read (GET/HEAD); needs AUTH_TOKEN too.",
        secret=True,
    ),
    Setting(
        "AUTH_READ_TOKEN_FILE",
        "auth-read-token-file",
        None,
        non_empty,
        "File holding AUTH_READ_TOKEN.",
    ),
    Setting(
        "IDLE_TIMEOUT",
        "idle-timeout",
        "60",
        positive_seconds,
        "Seconds a connection may sit idle between requests before it is closed.",
    ),
    Setting(
        "REQUEST_TIMEOUT",
        "request-timeout",
        "30",
        positive_seconds,
        "Seconds a client has to send a whole request (headers and body) once it "
        "starts; slower ones get 408 and are disconnected.",
    ),
    Setting(
        "MAX_CONNECTIONS",
        "max-connections",
        "1000",
        positive_int,
        "Most client connections served at once (watch streams and blocking reads are "
        "counted by WATCH_MAX instead); a request on one beyond it gets 503 and the "
        "connection is closed.",
    ),
    Setting(
        "OUTPUT_BUFFER_BYTES",
        "output-buffer-bytes",
        "65536",
        positive_int,
        "Unsent answer bytes a connection may hold before dache stops reading its "
        "requests until the client takes them.",
    ),
    Setting(
        "PIPELINE_BUFFER_BYTES",
        "pipeline-buffer-bytes",
        "16384",
        positive_int,
        "Bytes of pipelined requests read ahead while a connection's request is handled.",
    ),
    Setting(
        "SEND_TIMEOUT",
        "send-timeout",
        "30",
        positive_seconds,
        "Seconds a connection may leave its answers unread (over OUTPUT_BUFFER_BYTES) "
        "before it is closed.",
    ),
    # -- watching changes (dache/store/changes.py, dache/web/watch.py)
    Setting(
        "WATCH_HISTORY",
        "watch-history",
        "10000",
        positive_int,
        "Recent changes kept in memory so a watcher can resume (since / Last-Event-ID).",
    ),
    Setting(
        "WATCH_HISTORY_BYTES",
        "watch-history-bytes",
        "16777216",
        positive_int,
        "Bytes the kept changes may take (keys, values and about 100 bytes each).",
    ),
    Setting(
        "WATCH_BUFFER",
        "watch-buffer",
        "1048576",
        positive_int,
        "Bytes of events held for a watcher that does not read; past it the watcher gets "
        "'event: error' and is disconnected.",
    ),
    Setting(
        "WATCH_HEARTBEAT",
        "watch-heartbeat",
        "15",
        positive_seconds,
        "Seconds between heartbeat comments on an idle watch stream (keeps proxies from "
        "closing it).",
    ),
    Setting(
        "WATCH_MAX",
        "watch-max",
        "10000",
        positive_int,
        "Most watch streams and blocking reads open at once, counted apart from "
        "MAX_CONNECTIONS; more get 503. A node needs MAX_CONNECTIONS + WATCH_MAX + 128 "
        "open files.",
    ),
    # -- the memory bound (dache/store/eviction.py)
    Setting(
        "MAX_MEMORY",
        "max-memory",
        "0",
        byte_size,
        "Bytes the entries may take in memory (e.g. 512mb, 2gb); 0: no bound. Past it, "
        "EVICTION_POLICY decides.",
    ),
    Setting(
        "EVICTION_POLICY",
        "eviction-policy",
        "noeviction",
        one_of(*EVICTION_POLICIES),
        "What a write that needs room past MAX_MEMORY does: noeviction answers 507; the "
        "others delete entries (allkeys-* any key, volatile-* keys with an expiry) by "
        "least recent use, least frequent use, at random, or soonest expiry (volatile-ttl).",
    ),
]


class Config:
    """The resolved settings: one attribute per setting (PORT -> config.port)."""

    def __init__(self, values: Mapping[str, Any]):
        self.__dict__.update(values)

    def replace(self, **changes: Any) -> Config:
        return Config({**self.__dict__, **changes})

    def __repr__(self) -> str:
        secret = {s.attr for s in SETTINGS if s.secret}
        shown = {k: ("<redacted>" if k in secret and v else v) for k, v in self.__dict__.items()}
        return f"Config({shown!r})"


def resolve(options: Mapping[str, Any], environ: Mapping[str, str]) -> Config:
    """
    Resolve every setting: the twistd option if given, else the environment
    variable if set, else the default. Raises ConfigError on the first bad one.
    """
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        raw = options.get(setting.option)
        source = f"--{setting.option}"
        if raw is None:
            raw = environ.get(setting.env)
            source = setting.env
        if raw is None:
            values[setting.attr] = (
                None if setting.default is None else setting.parse(setting.default)
            )
            continue
        try:
            values[setting.attr] = setting.parse(raw)
        except ValueError as e:
            shown = "" if setting.secret else f" (got {raw!r})"
            raise ConfigError(f"{source} {e}{shown}") from None
    config = Config(values)
    validate(config)
    return config


def validate(config: Config) -> None:
    """Checks that span several settings."""
    if config.workers > 1:
        if config.durability_engine != "postgres":
            raise ConfigError(
                "WORKERS > 1 needs DURABILITY_ENGINE=postgres: workers are separate nodes "
                "that share their state through PostgreSQL"
            )
        if config.listen and config.listen.split(":", 1)[0] not in ("tcp", "unix", "systemd"):
            raise ConfigError("WORKERS > 1 works with tcp:, unix: or systemd: LISTEN endpoints")


def default_config(**overrides: Any) -> Config:
    """The defaults, with overrides; for tests and embedding."""
    return resolve({}, {}).replace(**overrides)


class Options(usage.Options):
    """`twistd dache` options, generated from SETTINGS."""

    synopsis = "[options]"
    longdesc = (
        "Serve dache, a durable cache over HTTP/JSON. Every option has an environment "
        "variable twin (shown in brackets); the option wins when both are set."
    )
    optFlags = [
        [
            "repair",
            None,
            "Repair the disk engine's log in DISK_PATH and exit: cut a torn tail, or keep "
            "a backup and truncate at the last good record.",
        ]
    ]
    optParameters = [
        [
            s.option,
            None,
            None,
            f"{s.help} [{s.env}]" + ("" if s.default is None else f" (default: {s.default})"),
        ]
        for s in SETTINGS
    ]
