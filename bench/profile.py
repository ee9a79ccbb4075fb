"""
Profile servers under load with py-spy (sampling, so the server runs at
nearly full speed) and print where their time goes:

    python -m bench.profile [--target dache-memory] [--kind "GET hit"]
                            [--connections 64] [--seconds 8] [--top 25]
                            [--with-ceiling]

--kind and --connections take comma-separated lists; --with-ceiling also
profiles the bare twisted.web resource (bench/ceiling.py) under the same
load, for each kind's ceiling kind, so the two compare like for like.
`make profile` runs GET hit, SET memory and DELETE at 1, 16, 64 and 256
connections with the ceiling beside them (bench/hot-path.md reads them).

Prints the functions with the most samples on top of the stack ("self") and
the most samples anywhere on the stack ("inclusive"); --folded keeps the raw
folded stacks (for flamegraph tools). py-spy sees Python frames only: time
in a system call shows as the Python function that made it (untilConcludes
is a send(), Connection.doRead a recv()); `perf record -g -p PID` shows the
kernel's side (bench/hot-path.md).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench.load import Sample, run_wrk
from bench.run import FULL, Bench
from bench.scenarios import KINDS, write_request_file
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
    parser.add_argument("--kind", default="GET hit", help="comma-separated scenario kinds")
    parser.add_argument("--connections", default="64", help="comma-separated counts")
    parser.add_argument("--value-bytes", type=int, default=100)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--with-ceiling", action="store_true", help="profile the ceiling too")
    parser.add_argument("--folded", help="keep the folded stacks in this directory")
    args = parser.parse_args(argv)
    kinds = [kind.strip() for kind in args.kind.split(",") if kind.strip()]
    counts = [int(n) for n in args.connections.split(",")]
    ceiling_target = f"ceiling-{args.value_bytes}"
    runs = []  # (target, kind, connections)
    for connections in counts:
        for kind in kinds:
            if args.with_ceiling and KINDS[kind][0] is not None:
                runs.append((ceiling_target, KINDS[kind][0], connections))
            runs.append((args.target, kind, connections))

    mode = dataclasses.replace(FULL, value_sizes=(args.value_bytes,))
    with tempfile.TemporaryDirectory(prefix="dache-profile-") as workdir:
        bench = Bench(mode, workdir)
        try:
            bench.start({target for target, _, _ in runs})
            for target, kind, connections in runs:
                server = bench.servers[target]
                sample, folded = profile_server(
                    server, kind, connections, args.value_bytes, args.seconds, workdir
                )
                if args.folded:
                    os.makedirs(args.folded, exist_ok=True)
                    name = f"{kind}-c{connections}.folded".replace(" ", "_")
                    shutil.copy(folded, os.path.join(args.folded, name))
                print(f"\n## {kind} on {target}, {connections} connections: ", end="")
                print(
                    f"{sample.rps:.0f} req/s, p50 {sample.p50_ms:.2f} ms, "
                    f"p99 {sample.p99_ms:.2f} ms, {sample.cpu_us or 0:.1f} us CPU/req"
                )
                print(summarize(folded, args.top), flush=True)
        finally:
            bench.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
