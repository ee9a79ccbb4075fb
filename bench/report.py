"""
bench/RESULTS.md and bench/results.png from one run's medians: every figure
side by side with the ceiling's (and etcd's) from the same run, and the
issue's targets checked at 64 connections and 100 B values.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass

from bench.load import Sample
from bench.neighbours import LOADED_SHARE
from bench.peers import RedisStartup, RespSample
from bench.scenarios import PEER_KINDS, PEERS, WHOLE_MACHINE_KINDS, Scenario
from bench.startup import Startup

Key = tuple[str, int, int]
# Where a request's CPU goes (issue 22): written by hand from `make profile`, carried into
# every RESULTS.md so a regeneration keeps it.
HOT_PATH_NOTES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hot-path.md")
TARGET_CONNECTIONS = 64
HOT_CONNECTIONS = (1, 16, 64, 256)  # GET hit's goal holds at each (issue 22)
TARGET_VALUE = 100


@dataclass
class Context:
    command: str
    mode: str
    rounds: int
    seconds: float
    warmup: float
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    elapsed: float
    machine: str
    others_share: float | None = None  # other work's share of the CPU during the rounds

    @property
    def loaded(self) -> bool:
        """Shared with other work: a load average of 1 before, or others' CPU during."""
        return self.load_before[0] >= 1 or (self.others_share or 0) >= LOADED_SHARE


@dataclass
class Target:
    what: str
    measured: str
    required: str
    status: str  # "met", "NOT met", or why it could not be measured


def median_sample(samples: list[Sample]) -> Sample:
    cpu = [s.cpu_us for s in samples if s.cpu_us is not None]
    shares = [s.load_share for s in samples if s.load_share is not None]
    return Sample(
        rps=statistics.median(s.rps for s in samples),
        p50_ms=statistics.median(s.p50_ms for s in samples),
        p99_ms=statistics.median(s.p99_ms for s in samples),
        requests=sum(s.requests for s in samples),
        non2xx=sum(s.non2xx for s in samples),
        errors=sum(s.errors for s in samples),
        cpu_us=statistics.median(cpu) if cpu else None,
        load_share=statistics.median(shares) if shares else None,
    )


class Runs:
    """
    One run's samples: scenario key -> one Sample per round, in round order.
    Figures are medians over the rounds; a ratio is the median of the ratios
    of each round (whose two runs were seconds apart), so a slow minute on a
    shared machine weighs on both sides of it.
    """

    def __init__(self, samples: Mapping[Key, list[Sample]]):
        self.samples = samples
        self.medians = {key: median_sample(rounds) for key, rounds in samples.items()}

    def __contains__(self, key: Key) -> bool:
        return key in self.medians

    def get(self, key: Key) -> Sample | None:
        return self.medians.get(key)

    def ratio(self, key: Key, other: Key) -> float | None:
        """key's req/s over other's."""
        pairs = zip(self.samples.get(key, []), self.samples.get(other, []), strict=False)
        ratios = [a.rps / b.rps for a, b in pairs if b.rps]
        return statistics.median(ratios) if ratios else None

    def cpu_ratio(self, key: Key, other: Key) -> float | None:
        """other's server CPU per request over key's: a throughput ratio noise barely moves."""
        pairs = zip(self.samples.get(key, []), self.samples.get(other, []), strict=False)
        ratios = [b.cpu_us / a.cpu_us for a, b in pairs if a.cpu_us and b.cpu_us]
        return statistics.median(ratios) if ratios else None


def _fmt(value: float | None, digits: int = 2, suffix: str = "×") -> str:
    return "–" if value is None else f"{value:.{digits}f}{suffix}"


def targets(runs: Runs, startups: list[Startup]) -> list[Target]:
    c, v = TARGET_CONNECTIONS, TARGET_VALUE
    rows: list[Target] = []

    def ratio_target(
        what: str, kind: str, other: str, required: float, connections: int = c
    ) -> None:
        key, other_key = (kind, connections, v), (other, connections, v)
        r = runs.ratio(key, other_key)
        if r is None:
            missing = kind if key not in runs else other
            rows.append(Target(what, "–", f"≥ {required}×", f"not measured ({missing})"))
            return
        measured = f"{r:.2f}×"
        by_cpu = runs.cpu_ratio(key, other_key)
        if by_cpu is not None:
            measured += f" (by CPU {by_cpu:.2f}×)"
        rows.append(Target(what, measured, f"≥ {required}×", _status(r >= required)))

    ratio_target("GET hit / ceiling GET", "GET hit", "ceiling GET", 0.9)
    # Issue 22: the hot path above the bare twisted.web resource at every connection count.
    for connections in HOT_CONNECTIONS:
        ratio_target(
            f"GET hit / ceiling GET, {connections} conns",
            "GET hit",
            "ceiling GET",
            1.1,
            connections,
        )
    ratio_target("DELETE / ceiling POST", "DELETE", "ceiling POST", 0.9)
    get = runs.get(("GET hit", c, v))
    if get is None:
        rows.append(Target("GET hit p99 / p50", "–", "≤ 3×", "not measured"))
    else:
        spread = get.p99_ms / get.p50_ms
        rows.append(
            Target(
                "GET hit p99 / p50",
                f"{spread:.2f}× ({get.p99_ms:.2f} / {get.p50_ms:.2f} ms)",
                "≤ 3×",
                _status(spread <= 3),
            )
        )
    ratio_target("SET memory / ceiling POST", "SET memory", "ceiling POST", 0.9)
    ratio_target("SET disk (fsync always) / ceiling POST", "SET disk", "ceiling POST", 0.75)
    ratio_target("SET postgres / ceiling POST", "SET postgres", "ceiling POST", 0.7)
    ratio_target("SET disk / etcd put", "SET disk", "etcd put", 1.0)
    ratio_target("SET postgres / etcd put", "SET postgres", "etcd put", 1.0)
    ratio_target("GET hit / etcd range", "GET hit", "etcd range", 2.5)
    for engine in ("disk", "postgres"):
        found = [s for s in startups if s.engine == engine]
        if not found:
            rows.append(Target(f"load 1M entries ({engine})", "–", "≤ 5 s", "not measured"))
            rows.append(Target(f"RSS overhead per entry ({engine})", "–", "≤ 250 B", "–"))
            continue
        s = found[0]
        if s.error or s.load_seconds is None:
            rows.append(Target(f"load ({engine})", "–", "≤ 5 s", f"error: {s.error}"))
            continue
        # Load time scales with entries; a smaller (quick) run is scaled to 1M.
        scaled = s.load_seconds * 1_000_000 / s.entries
        measured = f"{s.load_seconds:.2f} s for {s.entries:,}"
        if s.entries != 1_000_000:
            measured += f" (≈ {scaled:.1f} s per 1M)"
        rows.append(Target(f"load 1M entries ({engine})", measured, "≤ 5 s", _status(scaled <= 5)))
        overhead = s.overhead_per_entry
        rows.append(
            Target(
                f"RSS overhead per entry ({engine})",
                _fmt(overhead, 0, " B"),
                "≤ 250 B",
                "–" if overhead is None else _status(overhead <= 250),
            )
        )
        if engine == "disk":
            rows.extend(density_targets(s))
    return rows


def density_targets(s: Startup) -> list[Target]:
    """Issue 23's goals for the disk engine's node: start-up from a compacted log, RSS."""
    rows = []
    load = s.compacted_load_seconds
    if load is None:
        rows.append(Target("load 1M entries, compacted log (disk)", "–", "≤ 1.3 s", "not measured"))
    else:
        scaled = load * 1_000_000 / s.entries
        measured = f"{load:.2f} s for {s.entries:,}"
        if s.entries != 1_000_000:
            measured += f" (≈ {scaled:.1f} s per 1M)"
        rows.append(
            Target(
                "load 1M entries, compacted log (disk)", measured, "≤ 1.3 s", _status(scaled <= 1.3)
            )
        )
    per_entry, overhead = s.bytes_per_entry, s.overhead_per_entry
    for what, value, bound in (
        ("RSS per entry (disk)", per_entry, 200),
        ("RSS overhead per entry, goal of issue 23 (disk)", overhead, 120),
    ):
        rows.append(
            Target(
                what,
                _fmt(value, 0, " B"),
                f"≤ {bound} B",
                "–" if value is None else _status(value <= bound),
            )
        )
    return rows


def _status(ok: bool) -> str:
    return "met" if ok else "NOT met"


def targets_text(runs: Runs, startups: list[Startup]) -> str:
    lines = ["Targets (64 connections unless named, 100 B values):"]
    for t in targets(runs, startups):
        lines.append(f"  {t.what:42} {t.measured:32} {t.required:8} {t.status}")
    return "\n".join(lines)


def _spread(samples: list[Sample]) -> float | None:
    """(max - min) / median of req/s over the rounds: how noisy a scenario was."""
    if len(samples) < 2:
        return None
    rates = [s.rps for s in samples]
    return (max(rates) - min(rates)) / statistics.median(rates)


def markdown(
    context: Context,
    scenarios: list[Scenario],
    runs: Runs,
    missing: Mapping[str, str],
    startups: list[Startup],
    rss: Mapping[str, int],
    profiles: Mapping[str, str] | None = None,
    resp: Mapping[tuple[str, int], list[dict[str, RespSample]]] | None = None,
    redis_startup: RedisStartup | None = None,
) -> str:
    out: list[str] = []
    w = out.append
    w("# dache benchmark results\n")
    w(
        f"Written by `{context.command}` ({context.mode} mode) on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, in {context.elapsed:.0f} s. "
        f"Machine: {context.machine}.\n"
    )
    w(
        "Every server (dache, the ceiling, etcd) is pinned to core 0 and wrk (one thread) "
        "to core 1 with `taskset`, on loopback; the PostgreSQL that the postgres engine "
        "writes to runs on core 1 too, beside wrk, as a database on its own host would "
        "not take dache's core (its fsync is on: synchronous commits). "
        f"Each scenario ran {context.rounds} "
        f"round(s) of {context.seconds:g} s after a {context.warmup:g} s warm-up, the "
        "rounds interleaved with every other scenario; figures are medians, and a ratio "
        "is the median of the ratios within each round (runs seconds apart). Ratios "
        "compare figures from this same run: `× ceiling` is against the bare "
        "twisted.web resource (bench/ceiling.py) for the same method, connections and "
        "value size; `× etcd` against etcd's v3 JSON gateway (put for durable sets, "
        "range for GET). `CPU µs/req` is the server process's user + system CPU time "
        "per request (all threads; from /proc), and `× ceiling by CPU` the ceiling's "
        "CPU per request over this one's: on a shared machine it moves far less than "
        "req/s, so it tells whether a ratio is the code or the neighbours.\n"
    )
    noise = [
        spread
        for key, rounds in runs.samples.items()
        if key[0].startswith("ceiling") and (spread := _spread(rounds)) is not None
    ]
    if context.loaded:
        w(
            "**Loaded machine.** Other work shared it during this run, so absolute req/s "
            "and latencies are noise; ratios within a round weigh less on it, and a run on "
            "a quiet machine (load average below 1) is still needed.\n"
        )
    others = (
        f"; other processes took {context.others_share:.0%} of the machine's CPU time "
        "during the rounds"
        if context.others_share is not None
        else ""
    )
    w(
        f"Noise: load average {context.load_before[0]:.2f} before, "
        f"{context.load_after[0]:.2f} after (the bench's own load included){others}"
        + (
            f"; the ceiling's req/s varied by a median {statistics.median(noise):.0%} "
            f"(max {max(noise):.0%}) between rounds."
            if noise
            else "."
        )
        + "\n"
    )

    w("## Targets\n")
    w(
        f"At {TARGET_CONNECTIONS} connections (unless a row names its own) and "
        f"{TARGET_VALUE} B values.\n"
    )
    w("| target | measured | required | status |")
    w("| --- | --- | --- | --- |")
    for t in targets(runs, startups):
        w(f"| {t.what} | {t.measured} | {t.required} | {t.status} |")
    w("")

    w("## Throughput and latency\n")
    w(
        "| scenario | conns | value | req/s | p50 ms | p99 ms | p99/p50 | CPU µs/req "
        "| × ceiling | × ceiling by CPU | × etcd | notes |"
    )
    w("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for s in scenarios:
        m = runs.get(s.key)
        if m is None:
            continue
        ceiling_key = s.counterpart(s.ceiling_kind) if s.ceiling_kind else None
        vs_ceiling = runs.ratio(s.key, ceiling_key) if ceiling_key else None
        vs_ceiling_cpu = runs.cpu_ratio(s.key, ceiling_key) if ceiling_key else None
        peer = PEERS.get(s.kind)
        vs_etcd = runs.ratio(s.key, s.counterpart(peer)) if peer else None
        notes = []
        if s.expects_2xx and m.non2xx:
            notes.append(f"{m.non2xx} non-2xx")
        if not s.expects_2xx:
            notes.append("404 expected")
        if m.errors:
            notes.append(f"{m.errors} socket errors/timeouts")
        spread = _spread(runs.samples[s.key])
        if spread is not None and spread > 0.25:
            notes.append(f"rounds varied {spread:.0%}")
        size = f"{s.value_bytes // 1024} KiB" if s.value_bytes >= 1024 else f"{s.value_bytes} B"
        w(
            f"| {s.kind} | {s.connections} | {size} | {m.rps:,.0f} | {m.p50_ms:.2f} | "
            f"{m.p99_ms:.2f} | {m.p99_ms / m.p50_ms:.1f} | {_fmt(m.cpu_us, 1, '')} | "
            f"{_fmt(vs_ceiling)} | {_fmt(vs_ceiling_cpu)} | "
            f"{_fmt(vs_etcd)} | {', '.join(notes)} |"
        )
    w("")
    if missing:
        w("Not available yet:\n")
        for kind, why in missing.items():
            w(f"- {kind}: {why}")
        w("")

    out.extend(peers_markdown(scenarios, runs, resp or {}, startups, redis_startup))

    w("## Start-up load and memory\n")
    if not startups:
        w("No durable engine measured (none in dache.engines.REGISTRY, or --no-startup).\n")
    else:
        w(
            "Each engine filled with N entries (8-byte keys, 100-byte JSON values) through "
            "its own write(), then `twistd dache` started on it. `load` is dache's own "
            '"loaded N entries" figure; `to listening` is process start to accepting '
            "connections. Bytes per entry: (RSS full − RSS of the same engine empty) / N; "
            "overhead: that less the 108 bytes of key and value.\n"
        )
        w(
            "| engine | entries | fill s | load s | to listening s | RSS empty MiB "
            "| RSS full MiB | B/entry | overhead B/entry |"
        )
        w("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for s in startups:
            if s.error:
                w(f"| {s.engine} | {s.entries:,} | error: {s.error} | | | | | | |")
                continue
            w(
                f"| {s.engine} | {s.entries:,} | {_fmt(s.fill_seconds, 1, '')} | "
                f"{_fmt(s.load_seconds, 2, '')} | {_fmt(s.listening_seconds, 2, '')} | "
                f"{_mib(s.rss_empty)} | {_mib(s.rss_full)} | "
                f"{_fmt(s.bytes_per_entry, 0, '')} | {_fmt(s.overhead_per_entry, 0, '')} |"
            )
        for s in startups:
            if s.compacted_load_seconds is not None:
                w(
                    f"\n{s.engine}, started again after its log was compacted: load "
                    f"{s.compacted_load_seconds:.2f} s, to listening "
                    f"{_fmt(s.compacted_listening_seconds, 2, '')} s."
                )
        w("")
    if rss:
        w(
            "RSS of the servers after the load runs: "
            + ", ".join(f"{name} {_mib(value)} MiB" for name, value in sorted(rss.items()))
            + ".\n"
        )
    out.extend(hot_path_notes())
    if profiles:
        w("## Profiles\n")
        w(
            "py-spy sampling dache at 400 Hz under 64 connections, 100 B values (`python -m "
            "bench.profile --kind KIND` for more lines): the functions most often on top of "
            "the stack (self) and anywhere on it (inclusive).\n"
        )
        for kind, text in profiles.items():
            w(f"### {kind}\n")
            w("```")
            w(text)
            w("```\n")
    w("![throughput and p99 latency per scenario](results.png)\n")
    return "\n".join(out)


def hot_path_notes() -> list[str]:
    """bench/hot-path.md, its headings one level down, as a section of RESULTS.md."""
    if not os.path.exists(HOT_PATH_NOTES):
        return []
    with open(HOT_PATH_NOTES) as f:
        text = f.read()
    lines = ["#" + line if line.startswith("#") else line for line in text.splitlines()]
    return [*lines, ""]


def _mib(value: int | None) -> str:
    return "–" if value is None else f"{value / 2**20:.1f}"


def _is_peer(kind: str) -> bool:
    return kind.startswith(("etcd", "webdis"))


def chart(scenarios: list[Scenario], medians: Mapping[Key, Sample], path: str) -> None:
    """Req/s and p99 per scenario kind, one bar per connection count, per value size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = list(dict.fromkeys(s.kind for s in scenarios))  # bench.run's order: peers beside
    sizes = sorted({s.value_bytes for s in scenarios})
    connections = sorted({s.connections for s in scenarios})
    fig, axes = plt.subplots(
        2, len(sizes), figsize=(10 * len(sizes), 10), squeeze=False, sharey="row"
    )
    width = 0.8 / len(connections)
    for column, size in enumerate(sizes):
        kinds = list(
            dict.fromkeys(
                k for k in order if any(key[0] == k and key[2] == size for key in medians)
            )
        )
        for row, (field, label) in enumerate(
            (("rps", "requests/s"), ("p99_ms", "p99 latency, ms"))
        ):
            ax = axes[row][column]
            for i, conns in enumerate(connections):
                xs, ys, hatches = [], [], []
                for x, kind in enumerate(kinds):
                    m = medians.get((kind, conns, size))
                    if m is not None:
                        xs.append(x + (i - (len(connections) - 1) / 2) * width)
                        ys.append(getattr(m, field))
                        hatches.append("//" if _is_peer(kind) else "")
                bars = ax.bar(xs, ys, width, label=f"{conns} conn")
                for bar, hatch in zip(bars, hatches, strict=True):
                    bar.set_hatch(hatch)  # peers (etcd, Webdis) hatched
            ax.set_xticks(range(len(kinds)))
            ax.set_xticklabels(kinds, rotation=40, ha="right", fontsize=8)
            ax.set_ylabel(label)
            value = f"{size // 1024} KiB" if size >= 1024 else f"{size} B"
            ax.set_title(f"{label}, {value} values")
            ax.grid(axis="y", alpha=0.3)
            if row == 0 and column == 0:
                ax.legend(fontsize=8)
    fig.suptitle(
        "dache vs the bare twisted.web ceiling and the peers, etcd and Webdis + Redis "
        "(hatched; medians, one run)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# webdis kind -> (operation, durability level: dache's / Redis's)
PEER_LEVELS = {
    "webdis GET": ("GET", "served from memory (dache memory / Redis appendonly no)"),
    "webdis SET no": ("SET", "none (dache memory / Redis appendonly no)"),
    "webdis SET everysec": (
        "SET",
        "fsync every second (dache disk everysec / Redis appendfsync everysec)",
    ),
    "webdis SET always": (
        "SET",
        "fsync before the answer (dache disk always / Redis appendfsync always)",
    ),
    "webdis GET, 2 threads": ("GET", "whole machine: dache WORKERS=2 postgres / Webdis threads=2"),
    "webdis SET always, 2 threads": (
        "SET",
        "whole machine: dache WORKERS=2 postgres / Webdis threads=2, appendfsync always",
    ),
}

# redis-benchmark test -> (dache kind, Redis durability level) it is the limit for
RESP_LIMITS = {
    ("GET", "no"): "GET hit",
    ("SET", "no"): "SET memory",
    ("SET", "always"): "SET disk",
}


@dataclass
class PeerRow:
    """dache against its peer for one operation, durability level, connections and value size."""

    operation: str
    level: str
    connections: int
    value_bytes: int
    dache: Sample
    peer: Sample
    ratio: float | None
    cpu_ratio: float | None


def peer_rows(scenarios: list[Scenario], runs: Runs) -> list[PeerRow]:
    """Every measured (dache, Webdis) pair, in the table's order: level, then size, then conns."""
    peer_of = {**{v: k for k, v in PEER_KINDS.items()}}
    peer_of.update({k: v for k, v in WHOLE_MACHINE_KINDS.items() if v})
    rows = []
    for s in scenarios:
        peer_kind = peer_of.get(s.kind)
        if peer_kind is None or s.key not in runs:
            continue
        other = (peer_kind, s.connections, s.value_bytes)
        peer = runs.get(other)
        if peer is None:
            continue
        operation, level = PEER_LEVELS[peer_kind]
        dache = runs.get(s.key)
        assert dache is not None
        rows.append(
            PeerRow(
                operation,
                level,
                s.connections,
                s.value_bytes,
                dache,
                peer,
                runs.ratio(s.key, other),
                runs.cpu_ratio(s.key, other),
            )
        )
    levels = list(PEER_LEVELS.values())
    rows.sort(key=lambda r: (levels.index((r.operation, r.level)), r.value_bytes, r.connections))
    return rows


def _size_text(value_bytes: int) -> str:
    return f"{value_bytes // 1024} KiB" if value_bytes >= 1024 else f"{value_bytes} B"


def _latency(sample: Sample) -> str:
    return f"{sample.p50_ms:.2f} / {sample.p99_ms:.2f}"


def resp_medians(
    resp: Mapping[tuple[str, int], list[dict[str, RespSample]]],
) -> dict[tuple[str, str, int], RespSample]:
    """(test, Redis level, value size) -> medians over the rounds."""
    out = {}
    for (level, size), rounds in resp.items():
        for test in sorted({t for r in rounds for t in r}):
            found = [r[test] for r in rounds if test in r]
            out[(test, level, size)] = RespSample(
                rps=statistics.median(r.rps for r in found),
                p50_ms=statistics.median(r.p50_ms for r in found),
                p99_ms=statistics.median(r.p99_ms for r in found),
            )
    return out


def peers_markdown(
    scenarios: list[Scenario],
    runs: Runs,
    resp: Mapping[tuple[str, int], list[dict[str, RespSample]]],
    startups: list[Startup],
    redis_startup: RedisStartup | None,
) -> list[str]:
    out: list[str] = []
    w = out.append
    rows = peer_rows(scenarios, runs)
    if not rows and not resp and redis_startup is None:
        return out
    w("## Against the peers: Webdis + Redis\n")
    w(
        "Webdis (Redis's HTTP/JSON front end, one worker thread) and its Redis are both pinned "
        "to core 0, as dache is; wrk on core 1. `GET /GET/<key>` and `PUT /SET/<key>` (the "
        "body is the value: the same JSON text dache stores) against dache's `GET` and "
        "`POST /dache/<key>`, same keys, value sizes and connections. Redis runs with "
        "`appendonly no`, `appendfsync everysec` or `appendfsync always` against dache's "
        "memory, disk `everysec` and disk `always` engines. A ratio is dache's req/s over "
        "the peer's, the median of the per-round ratios: above 1 dache is ahead. `by CPU` is "
        "the peer's server CPU per request (Webdis + Redis) over dache's. Latencies in ms. "
        "The whole-machine rows leave every process unpinned on the 2 cores: dache with "
        "`WORKERS=2` (which needs the postgres engine: the workers are nodes sharing its "
        "table, so its SETs commit to PostgreSQL, also on the machine) against Webdis "
        "`threads=2` on a Redis with `appendfsync always`, wrk with 2 threads; `wrk CPU` is "
        "the load generator's share of the machine's CPU time in that run.\n"
    )
    if rows:
        out.extend(_ahead_markdown(rows))
        w(
            "| operation | durability | conns | value | dache req/s | peer req/s | dache / peer "
            "| by CPU | dache p50 / p99 | peer p50 / p99 | wrk CPU |"
        )
        w("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in rows:
            shares = [x.load_share for x in (r.dache, r.peer) if x.load_share is not None]
            share = " / ".join(f"{x:.0%}" for x in shares) if shares else ""
            w(
                f"| {r.operation} | {r.level} | {r.connections} | {_size_text(r.value_bytes)} | "
                f"{r.dache.rps:,.0f} | {r.peer.rps:,.0f} | **{_fmt(r.ratio)}** | "
                f"{_fmt(r.cpu_ratio)} | {_latency(r.dache)} | {_latency(r.peer)} | {share} |"
            )
        w("")
    limits = resp_medians(resp)
    if limits:
        w("### RESP's limit: redis-benchmark\n")
        w(
            "`redis-benchmark` (one thread, 64 clients, no pipelining, keys cycling through "
            "1000) pinned to core 1 against the same Redis on core 0: what the Redis protocol "
            "gets from the same core budget with no HTTP and no JSON. A limit to quote, not a "
            "like-for-like peer: no HTTP server, cache or HTTP client of the kind dache's "
            "users run is in the way. `dache / RESP` is dache's req/s at 64 connections over "
            "it (medians of both).\n"
        )
        w("| test | Redis | value | req/s | p50 ms | p99 ms | dache scenario | dache / RESP |")
        w("| --- | --- | ---: | ---: | ---: | ---: | --- | ---: |")
        for (test, level, size), r in sorted(limits.items()):
            kind = RESP_LIMITS.get((test, level))
            dache = runs.get((kind, 64, size)) if kind else None
            ratio = dache.rps / r.rps if dache and r.rps else None
            w(
                f"| {test} | {_redis_level(level)} | {_size_text(size)} | {r.rps:,.0f} | "
                f"{r.p50_ms:.2f} | {r.p99_ms:.2f} | {kind or ''} | {_fmt(ratio)} |"
            )
        w("")
    if redis_startup is not None:
        out.extend(_memory_markdown(startups, redis_startup))
    return out


def _redis_level(level: str) -> str:
    return "appendonly no" if level == "no" else f"appendfsync {level}"


def _memory_markdown(startups: list[Startup], redis: RedisStartup) -> list[str]:
    out: list[str] = []
    w = out.append
    w("### Memory per entry and start-up load, against Redis\n")
    if redis.error:
        w(f"Redis: error: {redis.error}\n")
    w(
        f"{redis.entries:,} entries of 100-byte values (bench.fill's 8-byte keys) in each. "
        "dache: the disk engine's figures from the start-up table below (its log replayed "
        "at start). Redis: filled through pipelined SETs with `appendfsync everysec` and "
        "automatic AOF rewrites off, so its AOF is the SET commands as dache's log is its "
        "writes; then restarted on it. Bytes per entry: (RSS full − RSS of the same server "
        "empty) / N. Load: each one's own figure (dache's \"loaded N entries in\", Redis's "
        '"DB loaded from append only file"). Each again after its compaction: dache after '
        'the disk engine compacted its log (bench.fill --compact: "B" blocks of the entries '
        "as held), Redis after `BGREWRITEAOF` (an RDB preamble).\n"
    )
    disk = next((s for s in startups if s.engine == "disk" and not s.error), None)
    w("| | dache (disk) | Redis | dache / Redis |")
    w("| --- | ---: | ---: | ---: |")
    dache_bpe = disk.bytes_per_entry if disk else None
    redis_bpe = redis.bytes_per_entry
    w(
        f"| RSS per entry, B | {_fmt(dache_bpe, 0, '')} | {_fmt(redis_bpe, 0, '')} | "
        f"{_fmt(_over(dache_bpe, redis_bpe))} |"
    )
    w(
        f"| RSS full, MiB | {_mib(disk.rss_full if disk else None)} | {_mib(redis.rss_full)} | "
        f"{_fmt(_over(disk.rss_full if disk else None, redis.rss_full))} |"
    )
    dache_load = disk.load_seconds if disk else None
    w(
        f"| load, s (log / AOF of commands) | {_fmt(dache_load, 2, '')} | "
        f"{_fmt(redis.load_seconds, 2, '')} | {_fmt(_over(dache_load, redis.load_seconds))} |"
    )
    compacted_load = disk.compacted_load_seconds if disk else None
    w(
        f"| load, s (compacted log / after BGREWRITEAOF) | {_fmt(compacted_load, 2, '')} | "
        f"{_fmt(redis.rewritten_load_seconds, 2, '')} | "
        f"{_fmt(_over(compacted_load, redis.rewritten_load_seconds))} |"
    )
    w(
        f"| process start to ready, s | {_fmt(disk.listening_seconds if disk else None, 2, '')} "
        f"| {_fmt(redis.listening_seconds, 2, '')} | "
        f"{_fmt(_over(disk.listening_seconds if disk else None, redis.listening_seconds))} |"
    )
    if redis.aof_bytes is not None:
        w(f"| AOF size, MiB | | {_mib(redis.aof_bytes)} | |")
    w("")
    w(
        "Lower is better in this table: a ratio above 1 is dache using more memory or "
        "taking longer.\n"
    )
    return out


def _over(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _ahead_markdown(rows: list[PeerRow]) -> list[str]:
    """One line each: where dache is ahead of its peer, and where not."""
    ahead = [r for r in rows if r.ratio is not None and r.ratio >= 1]
    behind = [r for r in rows if r.ratio is not None and r.ratio < 1]

    def where(r: PeerRow) -> str:
        level = r.level.split(" (")[0]
        return (
            f"{r.operation} {level}, c{r.connections} {_size_text(r.value_bytes)} ({_fmt(r.ratio)})"
        )

    lines = [
        f"dache is ahead in {len(ahead)} of {len(ahead) + len(behind)} pairs"
        + (": " + "; ".join(where(r) for r in ahead) if ahead else "")
        + ".",
    ]
    if behind:
        worst = min(behind, key=lambda r: r.ratio or 0)
        best = max(behind, key=lambda r: r.ratio or 0)
        lines.append(f"Behind in {len(behind)}: from {where(worst)} to {where(best)}.")
    return [" ".join(lines) + "\n"]
