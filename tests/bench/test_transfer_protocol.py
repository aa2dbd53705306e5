"""bench/emulator_transfer.py: the protocol's statistics and its report (no model is run here)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import emulator_transfer as protocol


def test_the_confidence_interval_is_students_t_over_seeds() -> None:
    stat = protocol.mean_ci([70.0, 74.0, 78.0])
    assert stat["mean"] == pytest.approx(74.0)
    # sd 4, n 3, t(0.975, 2) = 4.3027
    assert stat["ci95"] == pytest.approx(4.3027 * 4 / math.sqrt(3), rel=1e-4)
    assert math.isnan(protocol.mean_ci([70.0])["ci95"])


def _metrics(plug: float, emu_ft: float, full_ft: float, verbatim: int) -> dict[str, Any]:
    return {
        "run": {
            "plan": "2-8-2",
            "eval_examples": 500,
            "bundle_bytes": 200,
            "full_model_bytes": 1000,
            "privacy": {
                "middle_tensors_verbatim": verbatim,
                "middle_tensors": 234,
                "perplexity_ratio": 20.0,
            },
        },
        "scores": {
            "full_zero_shot": {"value": 0.5},
            "emulator_zero_shot": {"value": 0.3},
            "emulator_fine_tuned": {"value": emu_ft},
            "plug_in": {"value": plug},
            "full_fine_tuned": {"value": full_ft},
        },
        "timings": {"load full model and build emulator bundle": 60.0},
        "bench_wall_seconds": 600.0,
    }


def test_gaps_are_paired_per_seed_and_targets_are_judged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(protocol, "REPORTS", tmp_path)
    # plug-in and full FT move together across seeds: the paired gap is exact, its CI 0
    runs = [_metrics(0.80 + d, 0.70 + d, 0.81 + d, 0) for d in (0.0, 0.05, 0.10)]
    report: dict[str, Any] = {
        "protocol": {"seeds": 3, "eval_size": 500},
        "cells": {},
        "generalisation": {},
    }
    report["cells"][protocol.default_cell()] = {
        "rows": {str(s): {"seed": s, **protocol.seed_row(m)} for s, m in enumerate(runs)}
    }
    protocol._save(report)
    document = json.loads((tmp_path / "emulator_transfer.json").read_text())
    default = document["default"]
    assert default["plug_in"]["mean"] == pytest.approx(85.0)
    assert default["plug_in"]["ci95"] > 5  # seeds move the level a lot …
    assert default["plug_in_minus_full_ft"]["mean"] == pytest.approx(-1.0)
    assert default["plug_in_minus_full_ft"]["ci95"] == pytest.approx(0.0, abs=1e-9)  # … not the gap
    assert default["margin"]["mean"] == pytest.approx(10.0)
    for key in ("seeds", "eval_size", "verbatim_middle_tensors", "bundle_bytes"):
        assert key in default
    assert default["full_model_bytes"] == 1000 and default["build_s"] == 60.0
    markdown = (tmp_path / "emulator_transfer.md").read_text()
    assert "met: full FT − plug-in ≤ 2 points" in markdown
    assert "met: plug-in − emulator FT ≥ 5 points" in markdown
    assert "met: bundle ≤ 40 % of the full model" in markdown
    assert (tmp_path / "emulator_transfer.png").stat().st_size > 1000
    # a missed target is said so, in bold
    runs = [_metrics(0.74, 0.58, 0.92, 144) for _ in range(3)]
    report["cells"][protocol.default_cell()]["rows"] = {
        str(s): {"seed": s, **protocol.seed_row(m)} for s, m in enumerate(runs)
    }
    protocol._save(report)
    markdown = (tmp_path / "emulator_transfer.md").read_text()
    assert "**missed**: full FT − plug-in ≤ 2 points (measured -18.0 ± 0.0)" in markdown
    assert "**missed**: 0 verbatim middle tensors (measured 144)" in markdown


def test_other_tasks_are_judged_by_their_own_targets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(protocol, "REPORTS", tmp_path)
    report: dict[str, Any] = {"protocol": {"seeds": 3, "eval_size": 500}, "cells": {}}
    # zero-shot 50, full FT 90: the plug-in must reach 70; 72 does, with margin 72 - 60 = 12
    report["generalisation"] = {
        "good": {
            "rows": {
                str(s): {"seed": s, **protocol.seed_row(_metrics(0.72, 0.60, 0.90, 0))}
                for s in range(3)
            }
        },
        # the first private task: plug-in 34.0 at zero-shot 32.7, emulator FT 87.3
        "private": {
            "rows": {
                str(s): {"seed": s, **protocol.seed_row(_metrics(0.34, 0.873, 0.98, 0))}
                for s in range(3)
            }
        },
    }
    for rows in report["generalisation"]["private"]["rows"].values():
        rows["full_zs"] = 32.7
    protocol._save(report)
    document = json.loads((tmp_path / "emulator_transfer.json").read_text())
    good, private = document["generalisation"]["good"], document["generalisation"]["private"]
    assert good["targets"] == {"margin_at_least_5": True, "plug_in_recovers_half_the_gain": True}
    assert private["targets"] == {
        "margin_at_least_5": False,
        "plug_in_recovers_half_the_gain": False,
    }
    for key in ("plug_in", "full_ft", "emu_ft", "full_zs"):
        assert set(good[key]) == {"mean", "ci95"}
    assert document["default"] is None  # no default cell measured in this report
    markdown = (tmp_path / "emulator_transfer.md").read_text()
    assert "| private (2-8-2) | 3 |" in markdown and "**missed** | **missed** |" in markdown


def test_a_target_the_interval_crosses_is_not_called_met() -> None:
    assert protocol._at_least({"mean": 24.7, "ci95": 55.6}, 5) is None
    assert protocol._at_least({"mean": 24.7, "ci95": 2.0}, 5) is True
    assert protocol._at_least({"mean": 4.0, "ci95": 0.5}, 5) is False
    assert protocol._at_least({"mean": 6.0, "ci95": math.nan}, 5) is True  # one seed: no CI


def test_the_compressed_emulator_is_one_setting_in_both_benchmarks() -> None:
    """The client bench measures cells.COMPRESSED_OVERRIDES; the transfer protocol measured it
    as cell fisher43-int8-1-26-3, which is the configuration's default emulator: all three must
    build the same emulator (and the former default's cell still builds 2-26-2)."""
    from cells import COMPRESSED_OVERRIDES

    from offsite.config import load_config

    cell = protocol.CELLS["fisher43-int8-1-26-3"].overrides
    assert load_config(None, list(cell)) == load_config(None, list(COMPRESSED_OVERRIDES))
    assert load_config(None, list(COMPRESSED_OVERRIDES)) == load_config(None, [])
    assert protocol.default_cell() == "fisher43-int8-1-26-3"
    former = load_config(None, list(protocol.CELLS["fisher43-int8-2-26-2"].overrides)).emulator
    assert (former.bottom, former.top, former.keep) == (2, 2, -1)


def test_the_client_bench_names_the_default_placement_it_measures() -> None:
    """The client bench's cell name and bundle folder follow the default's placement (read from
    cells.COMPRESSED_OVERRIDES), so a placement change can never leave a stale name or bundle."""
    import client_matrix
    from cells import COMPRESSED_2_26_2_OVERRIDES, placement

    from offsite.config import load_config

    emulator = load_config(None, []).emulator
    bottom, middle, top = client_matrix.COMPRESSED_SHAPE
    assert (bottom, top) == (emulator.bottom, emulator.top)
    assert bottom + middle + top == 30  # every block of SmolLM2-135M: no middle block dropped
    assert client_matrix.COMPRESSED_CELL.startswith(f"offsite {bottom}-{middle}-{top} ")
    assert placement(COMPRESSED_2_26_2_OVERRIDES, blocks=30) == (2, 26, 2)
    with pytest.raises(ValueError, match="every middle block"):
        placement(("emulator.keep=8",), blocks=30)
