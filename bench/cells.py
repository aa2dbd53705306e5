"""Shared by the benchmark scripts: one `offsite simulate` run per cell, reused when finished."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

# A plain layer drop as every layer-drop cell was measured: no factorization, a float middle,
# norms as they are (the configuration's defaults). Pinned so a cell keeps meaning the same
# emulator whatever the defaults become; a later override (e.g. quantize) wins.
LAYER_DROP_OVERRIDES = (
    "emulator.factorize='none'",
    "emulator.quantize='none'",
    "emulator.fold_norms=false",
)
# The default emulator (bench cell fisher43-int8-1-26-3), spelled out so the benchmarks keep
# measuring it if the defaults move: 1 bottom and 3 top adapter blocks (since 2026-12-07; 2 + 2
# before), every middle block kept, norms folded, SVD in the LM loss's K-FAC metric with 43.3 %
# of the middle's parameters spread by loss, int8.
COMPRESSED_OVERRIDES = (
    "emulator.bottom=1",
    "emulator.top=3",
    "emulator.keep=-1",
    "emulator.factorize='fisher-svd'",
    "emulator.factorize_budget=0.433",
    "emulator.factorize_max_rank_fraction=1.0",
    "emulator.fold_norms=true",
    "emulator.quantize='int8'",
)

# The same compression at the former 2 + 2 placement (the default of 2026-12-06): benchmarks whose
# finished rows were measured on it keep measuring it (bench cell fisher43-int8-2-26-2, the
# LoRA-aggregation runs).
COMPRESSED_2_26_2_OVERRIDES = (*COMPRESSED_OVERRIDES, "emulator.bottom=2", "emulator.top=2")


def placement(overrides: tuple[str, ...], blocks: int) -> tuple[int, int, int]:
    """(bottom, middle, top) blocks of an emulator whose overrides keep every middle block, on a
    model of ``blocks`` blocks, as the configuration reads the overrides."""
    from offsite.config import load_config

    emulator = load_config(None, list(overrides)).emulator
    if emulator.keep != -1:
        raise ValueError("placement() needs an emulator that keeps every middle block")
    return emulator.bottom, blocks - emulator.bottom - emulator.top, emulator.top


# The LoRA aggregation modes the population benchmarks compare (federation.lora_aggregation,
# train.adapter): naive averaging of A and B, merge-exact, and frozen A (lora-fa, exact).
LORA_MODES: dict[str, tuple[str, ...]] = {
    "naive": ("train.adapter='lora'", "federation.lora_aggregation='naive'"),
    "merge-exact": ("train.adapter='lora'", "federation.lora_aggregation='merge-exact'"),
    "frozen-a": ("train.adapter='lora-fa'", "federation.lora_aggregation='naive'"),
}


def committed_report(path: Path) -> dict[str, Any]:
    """A bench report as it was before this run ({} when there is none): bench/out is not in
    git, so a fresh checkout's earlier seeds live only in the committed report."""
    return dict(json.loads(path.read_text())) if path.exists() else {}


def measured_before(committed: bool, run_dir: Path, fresh: bool) -> bool:
    """Whether a sweep skips a run: the committed report holds it (``committed``) and this
    checkout lacks its run folder (bench/out is not in git). A folder on disk is reused or run
    again by ``simulate_cell``; ``fresh`` re-runs every run."""
    return committed and not run_dir.exists() and not fresh


def quiet_setup() -> None:
    """Our loggers at INFO, third parties quiet, everything offline."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for ours in ("offsite", "emulator", "client", "coordinator"):
        logging.getLogger(ours).setLevel(logging.INFO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


def _failed(metrics_path: Path) -> bool:
    """A run that stopped with an error writes metrics without scores: run it again."""
    try:
        return bool(json.loads(metrics_path.read_text())["run"].get("failed"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return True


def simulate_cell(run_dir: Path, overrides: list[str], fresh: bool) -> dict[str, Any]:
    """The metrics of one simulation with ``overrides``; a finished run folder is reused, a
    failed one run again. A run that fails raises (the caller records it and goes on)."""
    from coordinator.state.folder import RunFolder
    from coordinator.workflow.simulate import simulate
    from offsite.config import load_config

    metrics_path = RunFolder(run_dir).metrics_path
    finished = metrics_path.is_file() and not _failed(metrics_path)
    if fresh or not finished:
        shutil.rmtree(run_dir, ignore_errors=True)
        config = load_config(None, overrides)
        start = time.perf_counter()
        simulate(config, run_dir)
        metrics = json.loads(metrics_path.read_text())
        metrics["bench_wall_seconds"] = time.perf_counter() - start
        metrics_path.write_text(json.dumps(metrics, indent=1))
    return json.loads(metrics_path.read_text())
