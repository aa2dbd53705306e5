"""bench/client_matrix.py: the verdict logic of the client benchmark (no model is run here)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import client_matrix

MB = 2**20


def _row(name: str, kind: str, tokens: float, peak_mb: float, measured: str) -> dict[str, Any]:
    return {
        "name": name,
        "kind": kind,
        "tokens_per_second": tokens,
        "peak_rss": peak_mb * MB,
        "rss_imports": 400 * MB,
        "measured": measured,
    }


def test_repeated_runs_report_the_median_and_keep_every_run() -> None:
    runs = [_row("c", "offsite", t, p, "d") for t, p in ((900, 1000), (1200, 950), (1000, 990))]
    row = client_matrix.median_row(runs)
    assert row["tokens_per_second"] == 1000
    assert row["peak_rss"] == 990 * MB
    assert [r["tokens_per_second"] for r in row["runs"]] == [900, 1200, 1000]


def test_ratios_are_against_the_faster_baseline_and_only_same_run_rows_can_be_best() -> None:
    rows = [
        _row("full FT fp32", "full-ft", 100, 6000, "today"),
        _row("full FT bf16", "full-ft", 150, 5600, "today"),
        _row("offsite lora bf16", "offsite", 600, 1200, "today"),
        _row("offsite 2-6-2 lora bf16", "offsite", 1200, 960, "today"),
        _row("offsite top bf16", "offsite", 3000, 500, "last week"),  # faster, but not this run
    ]
    accuracy = {"offsite lora bf16": 70.0, "offsite 2-6-2 lora bf16": 80.0, "offsite top bf16": 75}
    summary = client_matrix.summarise("m", rows, accuracy)
    assert summary["baseline"] == "full FT bf16"
    best = summary["best"]
    assert best["name"] == "offsite 2-6-2 lora bf16"
    assert best["speedup"] == 1200 / 150
    assert best["memory_ratio"] == 5600 / 960
    assert best["meets_speedup"] and best["meets_memory"]
    assert not rows[-1]["same_run_as_baseline"]


def test_speed_is_against_the_fastest_baseline_and_memory_against_the_lowest_peak() -> None:
    rows = [
        _row("full FT bf16", "full-ft", 150, 5600, "today"),  # trims the heap: lower peak
        _row("full FT bf16 no-trim", "full-ft", 170, 6100, "today"),  # faster, higher peak
        _row("offsite lora bf16", "offsite", 1200, 1000, "today"),
    ]
    summary = client_matrix.summarise("m", rows, {"offsite lora bf16": 70.0})
    assert summary["baseline"] == "full FT bf16 no-trim"
    assert summary["memory_baseline"] == "full FT bf16"
    best = summary["best"]
    assert best["speedup"] == 1200 / 170
    assert best["memory_ratio"] == 5600 / 1000


def test_a_policy_that_loses_more_than_a_point_is_not_eligible() -> None:
    rows = [
        _row("full FT bf16", "full-ft", 150, 5600, "today"),
        _row("offsite lora bf16", "offsite", 600, 1200, "today"),
        _row("offsite top bf16", "offsite", 1500, 800, "today"),
    ]
    summary = client_matrix.summarise(
        "m", rows, {"offsite lora bf16": 70.7, "offsite top bf16": 69.6}
    )
    assert summary["best"]["name"] == "offsite lora bf16"
    assert not summary["best"]["meets_speedup"]


def test_the_plot_draws_the_goal_against_the_fastest_and_leanest_baselines() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baselines = [
        _row("full FT fp32", "full-ft", 150, 4200, "d"),
        _row("full FT bf16", "full-ft", 300, 3500, "d"),
    ]
    fig, ax = plt.subplots()
    client_matrix._draw_goal(ax, baselines)
    horizontal, vertical = ax.lines[0].get_ydata(), ax.lines[1].get_xdata()
    plt.close(fig)
    assert set(horizontal) == {client_matrix.GOALS["speedup"] * 300}  # the fastest baseline
    assert set(vertical) == {3500 / client_matrix.GOALS["memory"]}  # the leanest baseline
