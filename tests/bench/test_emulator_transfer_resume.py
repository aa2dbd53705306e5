"""bench/emulator_transfer.py: a checkout without bench/out runs only the seeds its committed
report lacks (no model is run here)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import emulator_transfer


def test_the_committed_seeds_are_not_run_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seed 0 of a cell is in the committed report and has no run folder: only seed 1 runs;
    ``fresh`` runs both."""
    name = next(iter(emulator_transfer.CELLS))
    reports = tmp_path / "reports"
    reports.mkdir()
    committed_row = {"seed": 0, "eval_size": 500, "plug_in": 80.0}
    committed = {"cells": {name: {"per_seed": [committed_row]}}}
    (reports / "emulator_transfer.json").write_text(json.dumps(committed))
    monkeypatch.setattr(emulator_transfer, "REPORTS", reports)
    monkeypatch.setattr(emulator_transfer, "WORK", tmp_path / "out")
    ran: list[Path] = []
    saved: list[dict[str, Any]] = []

    def run(run_dir: Path, overrides: list[str], fresh: bool) -> dict[str, Any]:
        ran.append(run_dir)
        return {}

    monkeypatch.setattr(emulator_transfer, "simulate_cell", run)
    monkeypatch.setattr(emulator_transfer, "seed_row", lambda metrics: {"plug_in": 70.0})
    monkeypatch.setattr(emulator_transfer, "gradient_score_of", lambda run_dir: {})
    monkeypatch.setattr(emulator_transfer, "_save", saved.append)

    report = emulator_transfer.run([name], 2, 500, False, [])
    assert ran == [emulator_transfer._run_folder("cells", name, 1)]
    assert report["cells"][name]["rows"]["0"]["plug_in"] == 80.0  # kept, not re-measured
    assert report["cells"][name]["rows"]["1"]["plug_in"] == 70.0

    ran.clear()
    emulator_transfer.run([name], 2, 500, True, [])
    assert ran == [emulator_transfer._run_folder("cells", name, s) for s in (0, 1)]
