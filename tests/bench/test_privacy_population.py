"""bench/privacy_population.py: which runs a sweep does and which rows its report keeps (no
model is run here)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import privacy_population


def _row(plug_in: float) -> dict[str, Any]:
    return {"plug_in": plug_in, "full_zs": 48.0, "epsilon_spent": None, "failed_rounds": 0}


def test_a_sweep_over_several_sessions_keeps_and_skips_the_committed_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bench/out is not in git and the sweep takes hours a seed: the runs the committed report
    holds survive a fresh checkout and are not run again; the rest are run and join them."""
    reports = tmp_path / "reports"
    monkeypatch.setattr(privacy_population, "REPORTS", reports)
    monkeypatch.setattr(privacy_population, "WORK", tmp_path / "out")
    monkeypatch.setattr(privacy_population, "plot", lambda report, path: None)
    committed = {"rows": {"frozen-a": {"100": {"none": {"0": _row(63.0)}, "8": {"0": _row(50.0)}}}}}
    reports.mkdir()
    (reports / "privacy_population.json").write_text(json.dumps(committed))
    ran: list[Path] = []

    def run(run_dir: Path, overrides: list[str], fresh: bool) -> dict[str, Any]:
        ran.append(run_dir.relative_to(tmp_path / "out"))
        return {"plug_in": 61.0 if "privacy.epsilon=8.0" in overrides else 64.0}

    monkeypatch.setattr(privacy_population, "simulate_cell", run)
    monkeypatch.setattr(
        privacy_population, "run_row", lambda metrics, run_dir, mode: _row(metrics["plug_in"])
    )
    argv = ["privacy_population.py", "--populations", "100,300", "--epsilons", "8"]
    monkeypatch.setattr(sys, "argv", argv)
    privacy_population.main()

    assert ran == [  # 100 clients, no DP and ε = 8, seed 0, are in the committed report
        Path("300/frozen-a/none/seed-0"),
        Path("300/frozen-a/8/seed-0"),
    ]
    report = json.loads((reports / "privacy_population.json").read_text())
    by_eps = report["curve"]["frozen-a"]["by_epsilon"]["8"]
    assert by_eps["100"]["cost"]["mean"] == pytest.approx(13.0)  # the committed pair
    assert by_eps["300"]["cost"]["mean"] == pytest.approx(3.0)  # this session's pair
    assert "300 clients" in (reports / "privacy.md").read_text()
