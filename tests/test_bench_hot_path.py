"""
The bench's pieces for issue 22 that are not timed: the 256-connection row
runs for the hot path's kinds only, the goals are checked per connection
count, and the hand-written profile notes are carried into RESULTS.md.
"""

from __future__ import annotations

from bench import report
from bench.load import Sample
from bench.run import FULL, HOT_KINDS, QUICK, WIDE_CONNECTIONS, runs_at


def test_the_wide_row_runs_for_the_hot_kinds_only():
    assert WIDE_CONNECTIONS in FULL.connections and WIDE_CONNECTIONS in QUICK.connections
    for kind in HOT_KINDS:
        assert runs_at(kind, WIDE_CONNECTIONS) and runs_at(kind, 64)
    assert not runs_at("SET disk", WIDE_CONNECTIONS) and runs_at("SET disk", 64)
    assert not runs_at("GET hit, metrics off", 16)


def _sample(rps: float, cpu_us: float) -> Sample:
    return Sample(rps, 1.0, 2.0, int(rps), 0, 0, cpu_us)


def test_the_get_goal_is_checked_at_every_connection_count_with_its_cpu_ratio():
    runs = report.Runs(
        {
            ("ceiling GET", 256, 100): [_sample(10_000, 50.0)],
            ("GET hit", 256, 100): [_sample(11_500, 40.0)],
            ("ceiling GET", 16, 100): [_sample(10_000, 50.0)],
            ("GET hit", 16, 100): [_sample(10_500, 47.0)],
        }
    )
    rows = {t.what: t for t in report.targets(runs, [])}
    wide = rows["GET hit / ceiling GET, 256 conns"]
    assert (wide.measured, wide.status) == ("1.15× (by CPU 1.25×)", "met")
    assert rows["GET hit / ceiling GET, 16 conns"].status == "NOT met"  # 1.05× < 1.1×
    assert rows["GET hit / ceiling GET, 1 conns"].status.startswith("not measured")
    assert rows["DELETE / ceiling POST"].status.startswith("not measured")


def test_the_profile_notes_become_a_section_of_results():
    notes = report.hot_path_notes()
    assert notes[0] == "## Where a request's CPU goes, against the bare twisted.web resource"
    assert "### After" in notes
    assert "RESULTS_TABLE" not in "\n".join(notes)
