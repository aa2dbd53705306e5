"""The owner's gates over measured cells: `offsite emulator build --choose REPORT`.

A report in the layout `offsite bench emulator` writes; the choice is the best plug-in among the
cells that pass every gate, margins judged by the low end of their interval, and a report in
which nothing passes is refused with exit code 6 and every reason.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from emulator.choice import Gates, candidates, choose, pareto_front
from tests.conftest import LAYER_DROP_OVERRIDES
from tests.offsite.test_cli import offsite


def _cell(plug_in: float, margin: float, ci: float, verbatim: int, share: float) -> dict[str, Any]:
    return {
        "seeds": 3,
        "overrides": ["emulator.keep=2"],
        "plug_in": {"mean": plug_in, "ci95": 1.0},
        "margin": {"mean": margin, "ci95": ci},
        "bundle_bytes": int(share * 1000),
        "full_model_bytes": 1000,
        "verbatim_middle_tensors": verbatim,
        "middle_tensors": 10,
        "perplexity_ratio": 3.0,
        "build_s": 20.0,
    }


REPORT = {
    "cells": {
        "faithful": _cell(85.0, -4.0, 1.0, 0, 0.5),  # better than the product for the data owner
        "leaky": _cell(80.0, 9.0, 1.0, 6, 0.7),  # ships 60 % of the middle verbatim
        "noisy": _cell(78.0, 6.0, 8.0, 0, 0.4),  # margin's interval reaches -2
        "good": _cell(75.0, 7.0, 1.0, 0, 0.35),
        "small": _cell(70.0, 8.0, 1.0, 0, 0.3),
        "unmeasured": {"seeds": 0},
    }
}


def test_the_best_plug_in_passing_every_gate_is_chosen() -> None:
    cells = candidates(REPORT)
    assert {c.name for c in cells} == {"faithful", "leaky", "noisy", "good", "small"}
    best, reasons = choose(
        cells, Gates(min_margin=0.0, max_verbatim_fraction=0.0, min_perplexity_ratio=0)
    )
    assert best is not None and best.name == "good"
    assert "below emulator.min_margin" in reasons["faithful"][0]
    assert "verbatim" in reasons["leaky"][0]
    assert "low end -2.0" in reasons["noisy"][0]  # 6.0 − 8.0: a noisy margin does not pass
    assert reasons["small"] == []
    # loosening the verbatim gate admits the leaky cell, which has the better plug-in
    loose, _ = choose(cells, Gates(0.0, 1.0, 0.0))
    assert loose is not None and loose.name == "leaky"
    # a perplexity-ratio gate above every cell's ratio refuses them all
    none, reasons = choose(cells, Gates(-100.0, 1.0, 5.0))
    assert none is None and all("perplexity ratio 3.00" in r[0] for r in reasons.values())


def test_the_pareto_front_drops_dominated_cells() -> None:
    cells = candidates(REPORT)
    front = [c.name for c in pareto_front(cells)]
    # noisy (78, +6, 40 %) is beaten by nobody on all three axes; good (75, +7, 35 %) neither
    assert front == ["faithful", "leaky", "noisy", "good", "small"]
    worse = {**REPORT["cells"], "dominated": _cell(74.0, 6.5, 1.0, 0, 0.36)}
    assert "dominated" not in [c.name for c in pareto_front(candidates({"cells": worse}))]
    assert math.isclose(candidates(REPORT)[0].margin_low, -5.0)


def test_the_cli_refuses_when_nothing_passes_and_names_why(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"cells": {"faithful": REPORT["cells"]["faithful"]}}))
    result = offsite("emulator", "build", "-o", str(tmp_path / "b"), "--choose", str(report))
    assert result.returncode == 6, result.stderr
    assert "refused faithful: margin -4.0" in result.stdout
    assert "no measured emulator" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "b").exists()


@pytest.mark.integration  # a real `offsite` process end to end
def test_the_cli_builds_the_chosen_cell(tmp_path: Path, tiny_llama_dir: Path) -> None:
    report = tmp_path / "report.json"
    report.write_text(json.dumps(REPORT))
    out = tmp_path / "b"
    result = offsite(
        "emulator",
        "build",
        "-o",
        str(out),
        "--choose",
        str(report),
        f"model.name={tiny_llama_dir}",
        "emulator.public_text=",
        *LAYER_DROP_OVERRIDES,
        "emulator.max_verbatim_fraction=1",
    )
    assert result.returncode == 0, result.stderr
    assert "chose leaky" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["layers"]["middle_kept"]) == 2  # the cell's emulator.keep=2 was applied


def test_an_unreadable_report_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"\xff\xfe not json")
    result = offsite("emulator", "build", "-o", str(tmp_path / "b"), "--choose", str(bad))
    assert result.returncode == 2 and "not a readable report" in result.stderr
