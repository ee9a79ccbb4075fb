"""
One checked run: start a workload and a nemesis schedule on a cluster, stop
them after `duration` seconds, heal every fault, wait for the nodes to
converge, read the final state and check the history against it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from tests.faults.cluster import Cluster, converge, table
from tests.faults.nemesis import Fault, Schedule
from tests.faults.workload import REQUEST_TIMEOUT, Workload
from tests.history import FAIL, OK, Anomaly, Report, check, dump

WINDOW_GAP = 1.0  # failed writes closer than this belong to one unavailability window


@dataclass
class Result:
    report: Report
    faults: list[Fault]
    nemesis_errors: list[str]
    windows: dict[str, list[tuple[float, float]]]  # node -> (start, seconds), writes failing
    seconds: float
    anomalies_file: str | None
    precondition_failed: int = 0  # If-Match writes that lost (412): definite, expected


def run(
    cluster: Cluster, names: list[str], duration: float, seed: int, out_dir: str, **schedule
) -> Result:
    began = time.monotonic()
    workload = Workload(cluster, seed)
    nemesis = Schedule(cluster, names, seed + 1, **schedule)
    workload.start()
    nemesis.start()
    try:
        time.sleep(duration)
    finally:
        nemesis.stop()
        workload.stop()
        cluster.heal()
    final = converge(cluster, workload.keys)
    ops = workload.history.ops
    report = check(ops, final, workload.home)
    if cluster.database is not None:  # memory mirrors the table
        held = table(cluster.database, workload.keys)
        report.anomalies += [
            Anomaly("table", key, f"nodes serve {final[key]}, the table holds {held[key]}")
            for key in workload.keys
            if held[key] != final[key]
        ]
    anomalies_file = None
    if report.anomalies:
        anomalies_file = os.path.join(out_dir, "anomalies.jsonl")
        dump(report, ops, anomalies_file)
    return Result(
        report,
        nemesis.faults,
        nemesis.errors,
        unavailability(ops, began),
        time.monotonic() - began,
        anomalies_file,
        sum(1 for op in ops if op.status == 412),
    )


def unavailability(ops, began: float) -> dict[str, list[tuple[float, float]]]:
    """Per node, the windows in which its writes were not acknowledged (412s aside)."""
    failing: dict[str, list[tuple[float, float]]] = {}
    for op in sorted(ops, key=lambda op: op.invoke):
        if not op.is_write or op.outcome == OK or (op.outcome == FAIL and op.status == 412):
            continue
        end = op.answered if op.answered is not None else op.invoke + REQUEST_TIMEOUT
        failing.setdefault(op.node, []).append((op.invoke, end))
    windows: dict[str, list[tuple[float, float]]] = {}
    for node, spans in failing.items():
        merged: list[list[float]] = []
        for start, end in spans:
            if merged and start - merged[-1][1] < WINDOW_GAP:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        windows[node] = [(start - began, end - start) for start, end in merged]
    return windows


def summary(result: Result) -> str:
    """The summary: ops by outcome, faults, anomalies, unavailability windows."""
    report = result.report
    lines = [f"run: {result.seconds:.0f} s, {report.keys} keys, {len(result.faults)} faults", ""]
    lines += ["| operation | ok | fail (412 included) | unknown |", "|---|---|---|---|"]
    for kind in ("set", "delete", "read"):
        row = [report.counts.get(f"{kind} {o}", 0) for o in ("ok", "fail", "unknown")]
        if kind == "set":
            row[1] = f"{row[1]} ({result.precondition_failed})"
        lines.append(f"| {kind} | " + " | ".join(str(n) for n in row) + " |")
    lines += ["", "| fault | count | seconds held (total) |", "|---|---|---|"]
    by_name: dict[str, list[Fault]] = {}
    for fault in result.faults:
        by_name.setdefault(fault.name, []).append(fault)
    for name, faults in sorted(by_name.items()):
        held = sum((f.ended or f.began) - f.began for f in faults)
        lines.append(f"| {name} | {len(faults)} | {held:.1f} |")
    lines += ["", "| anomaly check | count |", "|---|---|"]
    kinds: dict[str, int] = {}
    for anomaly in report.anomalies:
        kinds[anomaly.check] = kinds.get(anomaly.check, 0) + 1
    for name in ("lost", "order", "phantom", "back", "fork", "linear", "table"):
        lines.append(f"| {name} | {kinds.get(name, 0)} |")
    lines += ["", "| node | write-unavailability windows | longest (s) | total (s) |"]
    lines.append("|---|---|---|---|")
    for node, windows in sorted(result.windows.items()):
        longest = max((w[1] for w in windows), default=0.0)
        total = sum(w[1] for w in windows)
        lines.append(f"| {node} | {len(windows)} | {longest:.1f} | {total:.1f} |")
    lines += [
        "",
        f"cross-node read lag: median {report.lag_quantile(0.5) * 1000:.0f} ms, "
        f"p99 {report.lag_quantile(0.99) * 1000:.0f} ms, max {max(report.lag, default=0):.2f} s "
        f"({len(report.lag)} reads; includes reads by nodes that were cut off or frozen)",
    ]
    if result.nemesis_errors:
        lines += ["", "nemesis errors:"] + [f"  {e}" for e in result.nemesis_errors]
    if result.anomalies_file:
        lines += ["", f"anomalies written to {result.anomalies_file}"]
    return "\n".join(lines)
