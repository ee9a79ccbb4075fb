"""
A TCP proxy on loopback that stands between one dache node and PostgreSQL
and injects network faults into that node's connections only:

    heal()       forward everything as it comes
    blackhole()  a silent partition: nothing is forwarded either way and
                 nothing is refused or reset; the bytes wait in the proxy (as
                 TCP retransmits them across a real partition) and flow again
                 on heal(), so a transaction sent during the partition may
                 still commit afterwards: the in-doubt case
    delay(s)     every chunk of bytes is held `s` seconds before it is passed
                 on (a slow or distant PostgreSQL)
    cut()        every open connection is reset (RST, as a middlebox that
                 dropped its state); new ones are accepted
    drop()       packets between the node and the proxy are dropped by the
                 kernel (an iptables DROP rule on the proxy's port, both
                 directions): nothing is acknowledged, so TCP retransmits,
                 keepalives go unanswered and tcp_user_timeout gives up on a
                 long one, as across a real partition; new connections' SYNs
                 vanish too

A blackhole is done above the kernel: the node's kernel still acknowledges
its bytes to the proxy, so TCP keepalives and tcp_user_timeout do not fire
during one; what dache does meanwhile (answer writes 503 after WRITE_TIMEOUT,
keep serving reads, turn /health to warn) is the same. drop() is the real
thing, and needs root and iptables (installed from Debian when missing).
"""

from __future__ import annotations

import selectors
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections import deque

from tests import debian

PASS, BLACKHOLE = "pass", "blackhole"
CHUNK = 65536


class FaultProxy:
    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.mode = PASS
        self.latency = 0.0
        self._pairs: dict[socket.socket, socket.socket] = {}
        # bytes waiting to go to a socket: (due time, data), oldest first
        self._pending: dict[socket.socket, deque[tuple[float, bytes]]] = {}
        self._lock = threading.Lock()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.listener, selectors.EVENT_READ)
        self._stopping = False
        self._dropping = False
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()

    # -- faults

    def heal(self) -> None:
        with self._lock:
            self.mode, self.latency = PASS, 0.0
        self._undrop()

    def drop(self) -> None:
        if not self._dropping:
            for rule in self._drop_rules():
                _iptables("-I", *rule)
            self._dropping = True

    def _undrop(self) -> None:
        if self._dropping:
            for rule in self._drop_rules():
                _iptables("-D", *rule)
            self._dropping = False

    def _drop_rules(self) -> list[list[str]]:
        match = ["INPUT", "-i", "lo", "-p", "tcp"]
        port = str(self.port)
        return [[*match, "--dport", port, "-j", "DROP"], [*match, "--sport", port, "-j", "DROP"]]

    def blackhole(self) -> None:
        with self._lock:
            self.mode = BLACKHOLE

    def delay(self, seconds: float) -> None:
        with self._lock:
            self.mode, self.latency = PASS, seconds

    def cut(self) -> None:
        with self._lock:
            for sock in list(self._pairs):
                self._close(sock, reset=True)

    def connections(self) -> int:
        with self._lock:
            return len(self._pairs) // 2

    def close(self) -> None:
        self._undrop()
        self._stopping = True
        self._thread.join(5)
        with self._lock:
            for sock in list(self._pairs):
                self._close(sock, reset=False)
        self.listener.close()

    # -- the loop

    def _run(self) -> None:
        while not self._stopping:
            with self._lock:
                self._flush()
                self._watch()
            for key, _ in self._selector.select(timeout=0.005):
                with self._lock:
                    if key.fileobj is self.listener:
                        self._accept()
                    elif key.fileobj in self._pairs:
                        self._receive(key.fileobj)

    def _watch(self) -> None:
        """Read from a socket only while passing and while its peer's queue is short."""
        for sock, peer in self._pairs.items():
            wanted = self.mode == PASS and len(self._pending.get(peer, ())) < 64
            registered = sock in self._selector.get_map()
            if wanted and not registered:
                self._selector.register(sock, selectors.EVENT_READ)
            elif registered and not wanted:
                self._selector.unregister(sock)

    def _accept(self) -> None:
        try:
            client, _ = self.listener.accept()
        except BlockingIOError:
            return
        try:
            server = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        for sock in (client, server):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._pending[sock] = deque()
        self._pairs[client], self._pairs[server] = server, client

    def _receive(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close(sock, reset=False)
            return
        self._pending[self._pairs[sock]].append((time.monotonic() + self.latency, data))

    def _flush(self) -> None:
        if self.mode != PASS:
            return
        now = time.monotonic()
        for sock, queue in list(self._pending.items()):
            while queue and queue[0][0] <= now and sock in self._pairs:
                due, data = queue[0]
                try:
                    sent = sock.send(data)
                except BlockingIOError:
                    break
                except OSError:
                    self._close(sock, reset=False)
                    break
                if sent < len(data):
                    queue[0] = (due, data[sent:])
                    break
                queue.popleft()

    def _close(self, sock: socket.socket, reset: bool) -> None:
        if sock not in self._pairs:
            return  # closed with its peer already
        peer = self._pairs.pop(sock, None)
        for s in (sock, peer):
            if s is None:
                continue
            self._pairs.pop(s, None)
            self._pending.pop(s, None)
            if s in self._selector.get_map():
                self._selector.unregister(s)
            if reset:  # linger 0: close() sends RST
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()


def _iptables(*args: str) -> None:
    debian.ensure("iptables", lambda: shutil.which("iptables") is not None)
    subprocess.run(["iptables", *args], capture_output=True, check=True, timeout=30)
