"""
systemd's service notification protocol (sd_notify(3)) for `Type=notify`:

    READY=1      once the cache is loaded and the port is listening
    STOPPING=1   as soon as shutdown begins
    WATCHDOG=1   every half WATCHDOG_USEC, when the unit sets WatchdogSec=

The protocol is one datagram of "KEY=value" lines sent to the unix socket
named by $NOTIFY_SOCKET ("@name" for the abstract namespace). That is a few
lines, so they live here rather than in a dependency: the usual package for
it (sdnotify) has not had a release since 2017 and drops errors silently,
where these log them. Outside systemd (no NOTIFY_SOCKET) nothing is sent.

Socket activation needs no code of dache's: Twisted's `systemd:` endpoint
(--listen systemd:domain=INET:index=0) adopts the socket systemd passes in
LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Any

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

NOTIFY_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def notify_address(environ: Mapping[str, str]) -> str | None:
    """The address of $NOTIFY_SOCKET as socket.sendto takes it, or None."""
    address = environ.get("NOTIFY_SOCKET")
    if not address:
        return None
    if address.startswith("@"):
        return "\0" + address[1:]  # abstract namespace
    return address


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between WATCHDOG=1 pings (half the timeout), or None if not asked."""
    watchdog_pid = environ.get("WATCHDOG_PID")
    if watchdog_pid and watchdog_pid != str(pid):
        return None  # the watchdog is meant for another process
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


class SystemdNotifier:
    """Tells systemd how a DacheService is doing."""

    log = Logger()

    def __init__(self, address: str, clock: Any, watchdog: float | None = None):
        self.address = address
        self.watchdog = watchdog
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setblocking(False)  # never stall the reactor on systemd
        self._pinger = LoopingCall(self.send, "WATCHDOG=1")
        self._pinger.clock = clock

    @classmethod
    def from_environ(
        cls, clock: Any, environ: Mapping[str, str] | None = None
    ) -> SystemdNotifier | None:
        """
        A notifier if systemd asked for notifications, else None. Reading the
        process environment also removes these variables from it (as
        sd_notify's unset_environment does), so WORKERS never inherit them:
        systemd listens to the main process only.
        """
        if environ is None:
            environ = {
                name: os.environ.pop(name) for name in NOTIFY_VARIABLES if name in os.environ
            }
        address = notify_address(environ)
        if address is None:
            return None
        return cls(address, clock, watchdog_interval(environ, os.getpid()))

    def follow(self, dache: Any) -> None:
        """Report `dache` (a starting DacheService): watchdog now, READY when it is."""
        if self.watchdog is not None:
            self._pinger.start(self.watchdog, now=True)
        dache.ready.addCallbacks(self._ready, self._failed, (dache,))

    def _ready(self, result: Any, dache: Any) -> Any:
        host = dache.port.getHost()
        where = getattr(host, "port", None) or getattr(host, "name", "?")
        self.send(f"READY=1\nSTATUS=serving {len(dache.cache)} entries on {where}")
        return result

    def _failed(self, failure: Any) -> Any:
        self.send("STATUS=dache could not start; see its log")
        return failure

    def stopping(self) -> None:
        self.send("STOPPING=1\nSTATUS=stopping")

    def send(self, state: str) -> bool:
        try:
            self._socket.sendto(state.encode("utf-8"), self.address)
        except OSError as e:
            self.log.warn(
                "could not notify systemd ({state}): {error}",
                state=state.partition("\n")[0],
                error=e,
            )
            return False
        return True

    def close(self) -> None:
        if self._pinger.running:
            self._pinger.stop()
        self._socket.close()
