"""
Run a command with a pseudo-terminal as its stdout and stderr (as in a shell
window), and return what a terminal would show: carriage-return redraws (a
progress bar) collapsed to their last state.
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import termios
import time
from collections.abc import Mapping, Sequence


def run_in_terminal(
    argv: Sequence[str],
    env: Mapping[str, str],
    timeout: float = 60.0,
    rows: int = 24,
    columns: int = 100,
    answer: tuple[str, str] | None = None,
) -> tuple[int, str, str]:
    """
    (exit code, the raw bytes written as text, the screen's text). `answer`:
    (a prompt, what to type): the terminal is stdin too, and once the prompt is
    shown the text is typed (and echoed, as a terminal does).
    """
    controller, terminal = pty.openpty()
    # a window of its own size: a new pty says 0x0, and tqdm would draw a bar 0 columns wide
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    try:
        process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL if answer is None else terminal,
            stdout=terminal,
            stderr=terminal,
            env=dict(env),
        )
    finally:
        os.close(terminal)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([controller], [], [], left)[0]:
            process.kill()
            raise AssertionError(f"{argv} still running after {timeout} s")
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: every writer closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
        if answer is not None and answer[0].encode() in b"".join(chunks):
            os.write(controller, answer[1].encode())
            answer = None
    os.close(controller)
    code = process.wait(max(1.0, deadline - time.monotonic()))
    raw = b"".join(chunks).decode("utf-8", "replace")
    return code, raw, screen(raw)


def screen(raw: str) -> str:
    """Lines as displayed: text after a line's last carriage return wins."""
    lines = []
    for line in raw.replace("\r\n", "\n").split("\n"):
        lines.append(line.rsplit("\r", 1)[-1])
    return "\n".join(lines).rstrip("\n")
