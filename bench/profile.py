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
import subprocess
import sys
import tempfile
import time

from bench.load import run_wrk
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
    lines.append("inclusive:")
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in anywhere.most_common(top)]
    return "\n".join(lines)


def _short(frame: str) -> str:
    """'func (/long/path/pkg/mod.py:12)' -> 'func (pkg/mod.py)'."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rpartition(":")[0]
    return f"{name} ({'/'.join(path.split('/')[-2:])})"


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
    py_spy = os.path.join(os.path.dirname(sys.executable), "py-spy")

    with tempfile.TemporaryDirectory(prefix="dache-profile-") as workdir:
        bench = Bench(FULL, workdir)
        try:
            bench.start({args.target})
            server = bench.servers[args.target]
            requests = write_request_file(workdir, args.kind, args.value_bytes)
            run_wrk(server.url, requests, args.connections, 1)  # warm-up
            folded = args.folded or os.path.join(workdir, "profile.folded")
            spy = subprocess.Popen(
                pinned(LOAD_CPU, [py_spy, "record", "-p", str(server.pid), "-r", "400"])
                + ["-d", str(args.seconds - 2), "-f", "raw", "-o", folded],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(0.2)
            sample = run_wrk(server.url, requests, args.connections, args.seconds, server.pid)
            spy.wait(30)
        finally:
            bench.stop()
        print(f"{args.kind} on {args.target}, {args.connections} connections: ", end="")
        print(
            f"{sample.rps:.0f} req/s, p50 {sample.p50_ms:.2f} ms, p99 {sample.p99_ms:.2f} ms, "
            f"{sample.cpu_us:.1f} us CPU/req"
        )
        print(summarize(folded, args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
