"""
Profile a server under load with py-spy (sampling, so the server runs at
nearly full speed) and print where its time goes:

    python -m bench.profile [--target dache-memory] [--kind "GET hit"]
                            [--connections 64] [--seconds 8] [--top 25]

Prints the functions with the most samples on top of the stack ("self") and
the most samples anywhere on the stack ("inclusive"); --folded keeps the raw
folded stacks (for flamegraph tools).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench.load import Sample, run_wrk
from bench.run import FULL, Bench
from bench.scenarios import write_request_file
from bench.servers import LOAD_CPU, pinned


def summarize(folded: str, top: int) -> str:
    own: collections.Counter[str] = collections.Counter()
    anywhere: collections.Counter[str] = collections.Counter()
    total = 0
    with open(folded) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            n = int(count)
            total += n
            frames = [_short(frame) for frame in stack.split(";")]
            own[frames[-1]] += n
            for frame in set(frames):
                anywhere[frame] += n
    lines = [f"{total} samples", "self:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    # Inclusive, less the frames under nearly everything (twistd, the reactor loop).
    lines.append("inclusive (frames under less than 90% of samples):")
    shown = [(name, n) for name, n in anywhere.most_common() if n < 0.9 * total][:top]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in shown]
    return "\n".join(lines)


def _short(frame: str) -> str:
    """'func (/long/path/pkg/mod.py:12)' -> 'func (pkg/mod.py)'."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rpartition(":")[0]
    return f"{name} ({'/'.join(path.split('/')[-2:])})"


def profile_server(
    server: Any, kind: str, connections: int, value_bytes: int, seconds: int, workdir: str
) -> tuple[Sample, str]:
    """Load a running server with one scenario while py-spy samples it: (sample, folded)."""
    py_spy = os.path.join(os.path.dirname(sys.executable), "py-spy")
    requests = write_request_file(workdir, kind, value_bytes)
    run_wrk(server.url, requests, connections, 1)  # warm-up
    folded = os.path.join(workdir, f"profile-{server.pid}-{len(os.listdir(workdir))}.folded")
    spy = subprocess.Popen(
        pinned(LOAD_CPU, [py_spy, "record", "-p", str(server.pid), "-r", "400"])
        + ["-d", str(max(seconds - 2, 1)), "-f", "raw", "-o", folded],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.2)
    sample = run_wrk(server.url, requests, connections, seconds, server.pid)
    _, errors = spy.communicate(timeout=30)
    if not os.path.exists(folded):
        raise RuntimeError(f"py-spy wrote no profile: {errors.strip()[-300:]}")
    return sample, folded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="dache-memory")
    parser.add_argument("--kind", default="GET hit")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--value-bytes", type=int, default=100)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--folded", help="keep the folded stacks in this file")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="dache-profile-") as workdir:
        bench = Bench(FULL, workdir)
        try:
            bench.start({args.target})
            server = bench.servers[args.target]
            sample, folded = profile_server(
                server, args.kind, args.connections, args.value_bytes, args.seconds, workdir
            )
        finally:
            bench.stop()
        if args.folded:
            shutil.copy(folded, args.folded)
        print(f"{args.kind} on {args.target}, {args.connections} connections: ", end="")
        print(
            f"{sample.rps:.0f} req/s, p50 {sample.p50_ms:.2f} ms, p99 {sample.p99_ms:.2f} ms, "
            f"{sample.cpu_us:.1f} us CPU/req"
        )
        print(summarize(folded, args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
