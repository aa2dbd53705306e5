"""bench/lora_aggregation.py: which runs a sweep does and which rows its report keeps (no model
is run here)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import lora_aggregation

from coordinator.state.folder import RunFolder


def _metrics(plug_in: float) -> dict[str, Any]:
    scores = {
        "plug_in": {"value": plug_in},
        "emulator_fine_tuned": {"value": 0.5},
        "full_zero_shot": {"value": 0.48},
    }
    outcomes = [{"round": 1, "outcome": "aggregated", "lora_product_error": 0.02}]
    return {"run": {}, "scores": scores, "outcomes": outcomes, "bench_wall_seconds": 10.0}


def _write_run(run_dir: Path, plug_in: float) -> None:
    path = RunFolder(run_dir).metrics_path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_metrics(plug_in)))


def test_a_checkout_without_run_folders_keeps_and_skips_the_committed_seeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bench/out is not in git: the committed report's seeds survive a fresh checkout and are
    not run again; a sweep runs only the seeds missing, and its report holds both."""
    reports, work = tmp_path / "reports", tmp_path / "out"
    monkeypatch.setattr(lora_aggregation, "REPORTS", reports)
    monkeypatch.setattr(lora_aggregation, "WORK", work)
    monkeypatch.setattr(lora_aggregation, "plot", lambda report, path: None)
    committed = {
        "rows": {
            "100x3": {"naive": {"0": lora_aggregation.seed_row(_metrics(0.63))}},
            "16x3": {"frozen-a": {"0": lora_aggregation.seed_row(_metrics(0.55))}},
        }
    }
    reports.mkdir()
    (reports / "lora_aggregation.json").write_text(json.dumps(committed))
    ran: list[Path] = []

    def run(run_dir: Path, overrides: list[str], fresh: bool) -> dict[str, Any]:
        ran.append(run_dir)
        _write_run(run_dir, 0.61)
        return _metrics(0.61)

    monkeypatch.setattr(lora_aggregation, "simulate_cell", run)
    argv = ["lora_aggregation.py", "--populations", "100", "--modes", "naive", "--seeds", "2"]
    monkeypatch.setattr(sys, "argv", argv)
    lora_aggregation.main()

    assert ran == [work / "100x3" / "naive" / "seed-1"]  # seed 0 is in the committed report
    report = json.loads((reports / "lora_aggregation.json").read_text())
    naive = report["cells"]["100x3"]["naive"]
    assert naive["seeds"] == [0, 1] and naive["plug_in"]["mean"] == pytest.approx(62)
    assert report["rows"]["16x3"]["frozen-a"]["0"]["plug_in"] == pytest.approx(55)  # not asked
    assert list(report["rows"]) == ["16x3", "100x3"]  # populations in order

    # a run folder on disk replaces the committed row of its seed; --fresh re-runs a held seed
    _write_run(work / "100x3" / "naive" / "seed-0", 0.70)
    assert lora_aggregation.finished_rows()["100x3"]["naive"]["0"]["plug_in"] == pytest.approx(70)
    monkeypatch.setattr(sys, "argv", [*argv[:-1], "1", "--fresh"])
    ran.clear()
    lora_aggregation.main()
    assert ran == [work / "100x3" / "naive" / "seed-0"]
