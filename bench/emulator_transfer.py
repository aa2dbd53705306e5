"""Does the emulator transfer? The five-way protocol with seeds and confidence intervals.

Run: offsite bench emulator [--cells a,b] [--seeds 3] [--eval-size 500]
     (= .venv/bin/python bench/emulator_transfer.py …)

Every (cell, seed) is one real `offsite simulate` run on the embedded default task
(SmolLM2-135M, bbc-news, 4 non-IID clients, 3 rounds) with ``data.eval_size`` held-out examples
(500 by default: one example is 0.2 points) and ``seed`` changing the held-out split, the
clients' shares, the adapter's initialisation and sampling. All five settings are scored on the
same examples; full fine-tuning trains the same adapter recipe on the same training data.

For each cell: mean and 95 % confidence interval over seeds (Student t, n − 1 degrees of freedom) of
full zero-shot, emulator zero-shot, emulator fine-tuned, plug-in and full fine-tuning, and of the
paired per-seed differences the issue's targets are stated in (plug-in − full FT, margin = plug-in −
emulator FT); build seconds, bundle and full-model bytes, verbatim middle tensors. The full-model
baselines are cached by (weights, data, recipe) (coordinator/evaluation/baseline_cache.py), so a
second cell pays only for its emulator's three settings.

Runs land in bench/out/emulator_transfer/<cell>/seed-<s>/ and a finished run is reused (the
benchmark can stop at any time and resume); the report
(bench/reports/emulator_transfer.{json,md,png}) is rewritten after every run. The JSON's
``"default"`` object describes the emulator `offsite simulate` builds today: the cell whose
overrides amount to the configuration's defaults (``"default_cell"`` names it).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cells import (
    COMPRESSED_2_26_2_OVERRIDES,
    COMPRESSED_OVERRIDES,
    LAYER_DROP_OVERRIDES,
    committed_report,
    measured_before,
    quiet_setup,
    simulate_cell,
)

ROOT = Path(__file__).resolve().parent
REPORTS = ROOT / "reports"
WORK = ROOT / "out" / "emulator_transfer"
SETTINGS = (
    ("full_zs", "full_zero_shot", "full ZS"),
    ("emu_zs", "emulator_zero_shot", "emulator ZS"),
    ("emu_ft", "emulator_fine_tuned", "emulator FT"),
    ("plug_in", "plug_in", "plug-in"),
    ("full_ft", "full_fine_tuned", "full FT"),
)


@dataclass(frozen=True)
class Cell:
    name: str
    overrides: tuple[str, ...]
    what: str


def _distilled_int8(selection: str, keep: int, steps: int) -> tuple[str, ...]:
    """A distilled, int8-middle candidate; its distillation checkpoint is shared by its seeds
    (and by cells that only change the recipe), the checkpoint override last."""
    return (
        *LAYER_DROP_OVERRIDES,
        f"emulator.keep={keep}",
        f"emulator.selection='{selection}'",
        "emulator.distill=true",
        f"emulator.distill_steps={steps}",
        "emulator.quantize='int8'",
        f"emulator.distill_checkpoint='{WORK / f'distill-{selection}-{keep}-{steps}'}'",
    )


_COSINE_INT8_2_8_2 = _distilled_int8("cosine", 8, 100)

CELLS = {
    cell.name: cell
    for cell in (
        Cell(
            "uniform-2-16-2",
            (*LAYER_DROP_OVERRIDES, "emulator.keep=16", "emulator.selection='uniform'"),
            "plain uniform layer drop, 16 middle blocks shipped as they are: the "
            "configuration's defaults (the offsite-tuning reference without distillation)",
        ),
        Cell(
            "identity",
            (*LAYER_DROP_OVERRIDES, "emulator.keep=-1"),
            "the full model as its own emulator: the federation's ceiling for any emulator "
            "(its plug-in is federated full-model fine-tuning)",
        ),
        Cell(
            "cosine-distilled-2-8-2",
            (
                *LAYER_DROP_OVERRIDES,
                "emulator.keep=8",
                "emulator.selection='cosine'",
                "emulator.distill=true",
                f"emulator.distill_checkpoint='{WORK / 'distill-cosine-keep8'}'",
            ),
            "cosine selection, 8 middle blocks, distilled (best of bench/reports/emulator.md)",
        ),
        *(
            Cell(
                f"{selection}-distilled-int8-2-{keep}-2",
                _distilled_int8(selection, keep, steps),
                f"{selection} selection, {keep} middle blocks, {steps} distillation steps, int8 "
                "middle: a default candidate that fits the 5-minute build",
            )
            for selection, keep, steps in (
                ("uniform", 6, 100),
                ("uniform", 8, 100),
                ("cosine", 8, 100),
            )
        ),
        Cell(
            "cosine-distilled-int8-2-8-2-lora-top",
            (*_COSINE_INT8_2_8_2, "train.adapter='lora-top'"),
            "cosine-distilled-int8-2-8-2's emulator, LoRA in the top adapter blocks only (the "
            "bottom ones stay pretrained; backward never enters the emulator)",
        ),
        Cell(
            "cosine-jacobian-int8-2-8-2",
            (
                *_COSINE_INT8_2_8_2[:-1],
                "emulator.distill_jacobian_weight=30",
                f"emulator.distill_checkpoint='{WORK / 'distill-cosine-8-100-jacobian'}'",
            ),
            "cosine-distilled-int8-2-8-2 plus the Jacobian term (the middle's response to a "
            "perturbation of its input matched to the full middle's)",
        ),
        *(
            Cell(
                f"cosine-gradient{tag}-int8-2-8-2",
                (
                    *_COSINE_INT8_2_8_2[:-1],
                    "emulator.distill_gradient_weight=30",
                    f"emulator.distill_lm_weight={lm}",
                    f"emulator.distill_checkpoint='{WORK / f'distill-cosine-8-100-gradient{tag}'}'",
                ),
                "cosine-distilled-int8-2-8-2 plus the gradient term (the LM loss's gradient the "
                "middle passes back to its input, what the bottom adapter receives, matched to "
                "the full middle's)"
                + (
                    ", without the LM loss (the middle only matches the full one)"
                    if lm == 0
                    else ""
                ),
            )
            for tag, lm in (("", 1), ("-nolm", 0))
        ),
        Cell(
            "svd-int8-2-26-2",
            (
                "emulator.keep=-1",
                "emulator.factorize='svd'",
                "emulator.factorize_energy=0.9",
                "emulator.factorize_max_rank_fraction=0.5",
                "emulator.fold_norms=false",
                "emulator.quantize='int8'",
            ),
            "every middle block kept (depth preserved), each linear truncated-SVD factorized "
            "(at most half the break-even rank) then int8: training-free, no layer dropped",
        ),
        *(
            Cell(
                f"wsvd{round(100 * energy)}-int8-2-26-2",
                (
                    "emulator.keep=-1",
                    "emulator.factorize='whitened-svd'",
                    f"emulator.factorize_energy={energy}",
                    f"emulator.factorize_max_rank_fraction={cap}",
                    "emulator.fold_norms=true",
                    "emulator.quantize='int8'",
                ),
                "every middle block kept (depth preserved), norms folded into the linears, each "
                f"linear whitened-SVD factorized on public text (rank for {energy:.0%} of the "
                f"output energy, at most {cap:.0%} of the break-even rank), then int8: "
                "training-free, nothing dropped, nothing verbatim",
            )
            for energy, cap in ((0.9, 0.5), (0.95, 0.5), (0.98, 1.0), (0.99, 1.0))
        ),
        # (the default until 2026-12-07; fisher43-int8-1-26-3 since, cells.COMPRESSED_OVERRIDES,
        # which the client bench measures)
        Cell(
            "fisher43-int8-2-26-2",
            COMPRESSED_2_26_2_OVERRIDES,
            "every middle block kept, norms folded, each linear SVD-factorized in the LM loss's "
            "K-FAC metric on public text (inputs' and output gradients' second moments), one "
            "budget of 43.3 % of the middle's dense parameters (those of wsvd95-int8-2-26-2) "
            "spread where truncation costs the loss most, then int8: training-free, nothing "
            "verbatim",
        ),
        # the adapter's placement (2 + 2 is not sacred): the same compression of the middle,
        # the four adapter blocks split otherwise (same bundle size)
        *(
            Cell(
                f"fisher43-int8-{bottom}-26-{top}",
                (*COMPRESSED_OVERRIDES, f"emulator.bottom={bottom}", f"emulator.top={top}"),
                f"fisher43-int8-2-26-2's compression with {bottom} bottom and {top} top adapter "
                "blocks",
            )
            for bottom, top in ((1, 3), (3, 1))
        ),
        # MLP channel pruning before the same factorization budget (a share of the unpruned
        # middle: same bundle size), at both leading placements
        *(
            Cell(
                f"fisher43-prune{round(100 * share)}-int8-{bottom}-26-{top}",
                (
                    *COMPRESSED_OVERRIDES,
                    f"emulator.prune_mlp={share}",
                    f"emulator.bottom={bottom}",
                    f"emulator.top={top}",
                ),
                f"fisher43-int8-{bottom}-26-{top} with {share:.0%} of the middle's MLP channels "
                "pruned first where the LM loss needs them least",
            )
            for share in (0.25, 0.5)
            for bottom, top in ((2, 2), (1, 3))
        ),
        # how much LM loss the distillation may keep: 0 gave a positive margin and a low
        # plug-in, 1 the reverse (cosine-gradient-*)
        *(
            Cell(
                f"cosine-gradient-lm{weight}-int8-2-8-2",
                (
                    *_COSINE_INT8_2_8_2[:-1],
                    "emulator.distill_gradient_weight=30",
                    f"emulator.distill_lm_weight={weight}",
                    f"emulator.distill_checkpoint='{WORK / f'distill-cosine-8-100-lm{weight}'}'",
                ),
                f"cosine-gradient-int8-2-8-2 with the LM loss weighted {weight}",
            )
            for weight in (0.1, 0.3)
        ),
        Cell(
            "svd-distilled-2-8-2",
            (
                *LAYER_DROP_OVERRIDES,
                "emulator.keep=8",
                "emulator.selection='cosine'",
                "emulator.factorize='svd'",
                "emulator.distill=true",
                f"emulator.distill_checkpoint='{WORK / 'distill-svd-cosine-keep8'}'",
            ),
            "cosine 8 middle blocks, every middle linear SVD-factorized, then distilled",
        ),
    )
}


# Emulators and the default recipe on other tasks and models, never tuned on: does the default
# generalise beyond the task it was chosen on?
# Named task/cell: the default's rows are those of the default cell (``default_cell()``);
# Gemma3-270m has 18 blocks, 14 in the middle, so the 2-16-2 default keeps the same share of its
# middle there (16/26 of SmolLM2's ≈ 9/14).
_CHATTERBOT = ("data.name='chatterbot-topics'", "data.eval_size=300")
_GEMMA = ("model.name='gemma3-270m'",)
PROTOCOL_SEEDS = 3  # seeds per cell the report plans (a CI needs >= 3)

GENERALISATION = {
    "chatterbot-topics/uniform-2-16-2": (*_CHATTERBOT, *CELLS["uniform-2-16-2"].overrides),
    "gemma3-270m/bbc-news/uniform-2-9-2": (*_GEMMA, *LAYER_DROP_OVERRIDES, "emulator.keep=9"),
    # the leading candidates on the other task too: a method that only transfers on bbc-news
    # fails (distillation is on public text, so one checkpoint serves every task)
    "chatterbot-topics/cosine-distilled-int8-2-8-2": (*_CHATTERBOT, *_COSINE_INT8_2_8_2),
    "chatterbot-topics/wsvd95-int8-2-26-2": (
        *_CHATTERBOT,
        *CELLS["wsvd95-int8-2-26-2"].overrides,
    ),
    "chatterbot-topics/fisher43-int8-2-26-2": (
        *_CHATTERBOT,
        *CELLS["fisher43-int8-2-26-2"].overrides,
    ),
    # the best-screened adapter placement (1 bottom, 3 top) on the other task
    "chatterbot-topics/fisher43-int8-1-26-3": (
        *_CHATTERBOT,
        *CELLS["fisher43-int8-1-26-3"].overrides,
    ),
    # the default (fisher-svd 43 %, int8, every middle block kept) on the second catalog
    # architecture: 2-14-2 on Gemma3's 18 blocks until 2026-12-07, 1-14-3 since
    "gemma3-270m/bbc-news/fisher43-int8-2-14-2": (
        *_GEMMA,
        *CELLS["fisher43-int8-2-26-2"].overrides,
    ),
    "gemma3-270m/bbc-news/fisher43-int8-1-14-3": (
        *_GEMMA,
        *CELLS["fisher43-int8-1-26-3"].overrides,
    ),
}


def t_quantile(n: int) -> float:
    """The 0.975 quantile of Student's t with n − 1 degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1))


def mean_ci(values: list[float]) -> dict[str, float]:
    """Mean and half-width of its 95 % confidence interval (percent points)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "ci95": math.nan, "n": len(values)}
    half = t_quantile(len(values)) * statistics.stdev(values) / math.sqrt(len(values))
    return {"mean": mean, "ci95": half, "n": len(values)}


def seed_row(metrics: dict[str, Any]) -> dict[str, Any]:
    """What one run contributes: its five scores (percent) and its costs."""
    run, scores, timings = metrics["run"], metrics["scores"], metrics["timings"]
    privacy = run.get("privacy", {})
    cached = "emulator bundle" in metrics.get("notes", {})
    row: dict[str, Any] = {
        short: 100 * scores[key]["value"] for short, key, _ in SETTINGS if key in scores
    }
    row.update(
        plan=run["plan"],
        eval_size=run["eval_examples"],
        bundle_bytes=run["bundle_bytes"],
        full_model_bytes=run.get("full_model_bytes"),
        # a bundle copied from the cache is not a build: its seconds would understate the cost
        build_s=None if cached else timings.get("load full model and build emulator bundle"),
        bundle_cached=cached,
        verbatim_middle_tensors=privacy.get("middle_tensors_verbatim"),
        middle_tensors=privacy.get("middle_tensors"),
        perplexity_ratio=privacy.get("perplexity_ratio"),
        wall_s=metrics.get("bench_wall_seconds"),
    )
    return row


def five_way_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± CI over seeds of each setting and of the paired differences the targets use
    (plug-in − full FT where every seed has full FT, margin = plug-in − emulator FT)."""
    out: dict[str, Any] = {}
    for short, _, _ in SETTINGS:
        values = [r[short] for r in rows if short in r]
        if values:
            out[short] = mean_ci(values)
    if all("full_ft" in r for r in rows):
        out["plug_in_minus_full_ft"] = mean_ci([r["plug_in"] - r["full_ft"] for r in rows])
    out["margin"] = mean_ci([r["plug_in"] - r["emu_ft"] for r in rows])
    return out


def summarize(name: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One cell over its seeds: mean ± CI of each setting and of the paired differences."""
    what = CELLS[name].what if name in CELLS else f"the default emulator and recipe on {name}"
    out: dict[str, Any] = {"cell": name, "what": what, "seeds": len(rows)}
    if name in CELLS:  # how to build it (`offsite emulator build --choose`); no local paths
        out["overrides"] = [
            o for o in CELLS[name].overrides if not o.startswith("emulator.distill_checkpoint=")
        ]
    out.update(five_way_stats(rows))
    first = rows[0]
    for key in ("plan", "eval_size", "bundle_bytes", "full_model_bytes", "middle_tensors"):
        out[key] = first[key]
    out["verbatim_middle_tensors"] = first["verbatim_middle_tensors"]
    out["perplexity_ratio"] = first["perplexity_ratio"]
    built = [r["build_s"] for r in rows if r.get("build_s") is not None]
    out["build_s"] = statistics.fmean(built) if built else None  # fresh builds only
    scored = [r for r in rows if "gradient_error" in r]
    if scored:  # the emulator is the same for every seed: the first seed's bundle is scored
        out["gradient_error"] = scored[0]["gradient_error"]
        out["loss_rise"] = scored[0]["loss_rise"]
    out["per_seed"] = rows
    return out


_SCORING: dict[str, Any] = {}  # model name -> (model, tokenizer, arch, batches, references)


def _scoring_model(name: str, settings: Any) -> tuple[Any, ...]:
    from gradient_score import MAX_LENGTH, TEXTS

    from coordinator.models import load_full_model
    from emulator.batches import text_batches
    from emulator.build import public_texts

    if name not in _SCORING:
        model, tokenizer, arch, _ = load_full_model(name)
        texts = public_texts(settings.public_text, settings.public_examples + TEXTS)
        batches = text_batches(tokenizer, texts[settings.public_examples :], MAX_LENGTH, 8)
        _SCORING[name] = (model, tokenizer, arch, batches, {})
    return _SCORING[name]


def score_without_run(name: str) -> dict[str, float]:
    """Build cell ``name``'s emulator (seed 0) without running the federation and score it:
    for cells measured before the score existed, or whose run folders are gone."""
    from coordinator.state.folder import RunFolder
    from emulator.build import build_configured_bundle
    from offsite.config import load_config

    folder = RunFolder.at(WORK / name / "score")
    config = load_config(None, ["seed=0", *CELLS[name].overrides])
    if not (folder.bundle_dir / "manifest.json").exists():
        model, tokenizer, arch, _, _ = _scoring_model(config.model.name, config.emulator)
        build_configured_bundle(model, tokenizer, arch, config, folder.bundle_dir)
        folder.write_config(config)
    return gradient_score_of(folder.path)


def screen_cell(name: str) -> dict[str, Any]:
    """The cheap proxy for cell ``name``, before (or instead of) the full protocol: its
    emulator built once (seed 0) and scored by the gradient score, with bundle size and build
    time; cached in its ``score`` folder, so a re-run costs nothing."""
    from coordinator.state.folder import RunFolder
    from emulator.bundle import verify_bundle

    cached = WORK / name / "score" / "screen.json"
    if cached.is_file():
        return dict(json.loads(cached.read_text()))
    bundle = RunFolder.at(WORK / name / "score").bundle_dir
    start = time.perf_counter()
    built = not (bundle / "manifest.json").exists()
    row: dict[str, Any] = {"cell": name, **score_without_run(name)}
    row["bundle_bytes"] = verify_bundle(bundle).nbytes  # as the protocol's runs count it
    row["build_and_score_s"] = round(time.perf_counter() - start, 1) if built else None
    cached.write_text(json.dumps(row, indent=1))
    return row


def gradient_score_of(run_dir: Path) -> dict[str, float]:
    """The training-free gradient score (emulator/gradient_score.py) of the emulator a run
    shipped: its verified bundle against the full model, on the calibration texts of
    bench/gradient_score.py (public chitchat, never the task). The full model and its reference
    gradients are computed once per model and adapter placement."""
    from coordinator.state.folder import RunFolder
    from emulator.bundle import load_bundle_model, verify_bundle
    from emulator.gradient_score import full_reference_gradients, score_emulator

    folder = RunFolder.existing(run_dir)
    config = folder.config()
    model, _, arch, batches, references = _scoring_model(config.model.name, config.emulator)
    bundle = verify_bundle(folder.bundle_dir)
    plan = bundle.plan
    placement = plan.adapter_layers
    if placement not in references:
        references[placement] = full_reference_gradients(model, plan, arch, batches)
    score = score_emulator(
        model, load_bundle_model(bundle), plan, arch, batches, references[placement]
    )
    return {"gradient_error": score.gradient_error, "loss_rise": score.loss_rise}


def run(
    cells: list[str],
    seeds: int,
    eval_size: int,
    fresh: bool,
    tasks: list[str],
    score_only: bool = False,
    screen: bool = False,
) -> dict[str, Any]:
    quiet_setup()
    report: dict[str, Any] = {
        # the protocol's seeds per cell, not this invocation's: a run of fewer seeds adds rows
        "protocol": {"seeds": max(seeds, PROTOCOL_SEEDS), "eval_size": eval_size},
        "cells": _earlier_rows("cells", eval_size),
        "generalisation": _earlier_rows("generalisation", eval_size),
        "screen": _earlier_screen(),
    }
    if screen:
        for name in cells:
            report["screen"][name] = screen_cell(name)
            _save(report)
        return report
    if score_only:
        for name in cells:
            rows = report["cells"].get(name, {}).get("rows", {})
            if rows and not any("gradient_error" in r for r in rows.values()):
                first = rows[min(rows, key=int)]
                first.update(score_without_run(name))
                _save(report)
        return report
    for seed in range(seeds):  # seed-major: every cell gets a first number early
        for name in cells:
            cell = CELLS[name]
            overrides = [f"seed={seed}", f"data.eval_size={eval_size}", *cell.overrides]
            rows = report["cells"].setdefault(name, {"rows": {}})["rows"]
            run_dir = _run_folder("cells", name, seed)
            if measured_before(str(seed) in rows, run_dir, fresh):
                continue  # its row is in the committed report
            metrics = simulate_cell(run_dir, overrides, fresh)
            rows[str(seed)] = {"seed": seed, **seed_row(metrics)}
            # the emulator is the same for every seed: its first measured run is scored once
            if not any("gradient_error" in r for r in rows.values()):
                rows[str(seed)].update(gradient_score_of(run_dir))
            _save(report)
        for task in tasks:
            overrides = [f"seed={seed}", f"data.eval_size={eval_size}", *GENERALISATION[task]]
            rows = report["generalisation"].setdefault(task, {"rows": {}})["rows"]
            run_dir = _run_folder("generalisation", task, seed)
            if measured_before(str(seed) in rows, run_dir, fresh):
                continue  # its row is in the committed report
            metrics = simulate_cell(run_dir, overrides, fresh)
            rows[str(seed)] = {"seed": seed, **seed_row(metrics)}
            _save(report)
    return report


def _committed_report() -> dict[str, Any]:
    """The report as it was before this run ({} when there is none)."""
    return committed_report(REPORTS / "emulator_transfer.json")


def _earlier_rows(part: str, eval_size: int) -> dict[str, Any]:
    """Per-seed rows the committed report already holds for this protocol, so that running a
    subset of cells (or a checkout without bench/out) keeps every cell measured before; a run
    folder found again replaces its row."""
    from coordinator.state.folder import RunFolder

    earlier = _committed_report().get(part) or {}
    out: dict[str, Any] = {}
    for name, summary in earlier.items():
        if part == "cells" and name not in CELLS:
            continue
        # a generalisation task may set its own held-out size (chatterbot-topics: 300)
        wanted = eval_size if part == "cells" else _task_eval_size(name, eval_size)
        rows = {
            str(r["seed"]): r for r in summary.get("per_seed", []) if r.get("eval_size") == wanted
        }
        for seed, row in rows.items():  # build seconds as the run folder records them
            metrics = RunFolder(_run_folder(part, name, int(seed))).metrics_path
            if metrics.is_file():
                fresh = seed_row(json.loads(metrics.read_text()))
                row.update(build_s=fresh["build_s"], bundle_cached=fresh["bundle_cached"])
        if rows:
            out[name] = {"rows": rows}
    return out


def _run_folder(part: str, name: str, seed: int) -> Path:
    """Where run() keeps a cell's (or generalisation task's) seed."""
    if part == "cells":
        return WORK / name / f"seed-{seed}"
    return WORK / "generalisation" / name.replace("/", "--") / f"seed-{seed}"


def _earlier_screen() -> dict[str, Any]:
    """Screened cells the committed report holds (cells no longer defined are dropped)."""
    earlier = _committed_report().get("screen") or {}
    return {name: row for name, row in earlier.items() if name in CELLS}


def _task_eval_size(task: str, eval_size: int) -> int:
    """The held-out size a generalisation task runs with (its own override wins)."""
    sizes = [
        o.split("=", 1)[1] for o in GENERALISATION.get(task, ()) if o.startswith("data.eval_size=")
    ]
    return int(sizes[-1]) if sizes else eval_size


def _summaries(report: dict[str, Any], part: str = "cells") -> dict[str, Any]:
    return {
        name: summarize(name, list(cell["rows"].values()))
        for name, cell in report.get(part, {}).items()
        if cell["rows"]
    }


def task_targets(summary: dict[str, Any]) -> dict[str, bool]:
    """The issue's targets on a task other than bbc-news: plug-in at least full zero-shot plus
    half of full fine-tuning's gain, and a margin of at least +5 points."""
    out = {"margin_at_least_5": summary["margin"]["mean"] >= 5}
    if "full_ft" in summary:
        zero, full = summary["full_zs"]["mean"], summary["full_ft"]["mean"]
        out["plug_in_recovers_half_the_gain"] = (
            summary["plug_in"]["mean"] >= zero + (full - zero) / 2
        )
    return out


def _default_object(summary: dict[str, Any], seeds: int) -> dict[str, Any]:
    keys = ("plug_in", "full_ft", "emu_ft", "full_zs", "emu_zs", "margin", "plug_in_minus_full_ft")
    out = {
        k: {"mean": summary[k]["mean"], "ci95": summary[k]["ci95"]} for k in keys if k in summary
    }
    out.update(
        seeds=summary["seeds"],
        seeds_planned=seeds,
        eval_size=summary["eval_size"],
        plan=summary["plan"],
        verbatim_middle_tensors=summary["verbatim_middle_tensors"],
        bundle_bytes=summary["bundle_bytes"],
        full_model_bytes=summary["full_model_bytes"],
        build_s=summary["build_s"],
    )
    return out


def default_cell() -> str | None:
    """The cell whose configuration is the defaults: the emulator `offsite simulate` builds."""
    from offsite.config import load_config

    defaults = load_config(None, [])
    for name, cell in CELLS.items():
        kept = [o for o in cell.overrides if not o.startswith("emulator.distill_checkpoint=")]
        if load_config(None, kept) == defaults:
            return name
    return None


def _save(report: dict[str, Any]) -> None:
    REPORTS.mkdir(exist_ok=True)
    summaries = _summaries(report)
    default = default_cell()
    document = {
        "protocol": report["protocol"],
        "default_cell": default,
        "default": (
            _default_object(summaries[default], report["protocol"]["seeds"])
            if default in summaries
            else None
        ),
        "generalisation": {
            task: {
                **_default_object(summary, report["protocol"]["seeds"]),
                "targets": task_targets(summary),
                "per_seed": summary["per_seed"],
            }
            for task, summary in _summaries(report, "generalisation").items()
        },
        "cells": summaries,
        "score_vs_plug_in": score_correlation(summaries),
        "screen": report.get("screen", {}),
    }
    (REPORTS / "emulator_transfer.json").write_text(json.dumps(document, indent=1))
    (REPORTS / "emulator_transfer.md").write_text(_markdown(document))
    _plot(summaries, REPORTS / "emulator_transfer.png")


def score_correlation(summaries: dict[str, Any]) -> dict[str, Any]:
    """Spearman ρ of the gradient score (lower = better preserved) with the measured plug-in
    over the scored cells: negative when the score predicts transfer. The identity cell (score
    0 by construction) is left out: it is the ceiling, not a candidate."""
    cells = [
        (s["gradient_error"], s["plug_in"]["mean"], s["loss_rise"], s["margin"]["mean"])
        for name, s in summaries.items()
        if "gradient_error" in s and name != "identity"
    ]
    out: dict[str, Any] = {"cells": len(cells)}
    if len(cells) >= 3:
        from scipy.stats import spearmanr

        errors, plug_ins, rises, margins = (list(column) for column in zip(*cells, strict=True))
        out["gradient_error_vs_plug_in"] = float(spearmanr(errors, plug_ins).statistic)
        out["loss_rise_vs_plug_in"] = float(spearmanr(rises, plug_ins).statistic)
        out["loss_rise_vs_margin"] = float(spearmanr(rises, margins).statistic)
    return out


def _pm(stat: dict[str, float] | None) -> str:
    if not stat:
        return "–"
    if math.isnan(stat["ci95"]):
        return f"{stat['mean']:.1f}"
    return f"{stat['mean']:.1f} ± {stat['ci95']:.1f}"


def _markdown(document: dict[str, Any]) -> str:
    protocol = document["protocol"]
    lines = [
        "# Emulator transfer (SmolLM2-135M, bbc-news): five-way protocol",
        "",
        f"Written by `offsite bench emulator` (bench/emulator_transfer.py). {protocol['eval_size']}"
        f" held-out examples per run, {protocol['seeds']} seeds planned per cell (seed = held-out "
        "split, client shares, adapter init, sampling); mean ± 95 % CI over the seeds finished "
        "(Student t). Differences are paired per seed. Percent.",
        "",
        "| cell | seeds | full ZS | emulator ZS | emulator FT | plug-in | full FT | "
        "plug-in − full FT | margin | verbatim middle | bundle / full | build s | "
        "gradient error | loss rise |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in document["cells"].items():
        share = s["bundle_bytes"] / s["full_model_bytes"] if s.get("full_model_bytes") else None
        lines.append(
            f"| {name} ({s['plan']}) | {s['seeds']} | "
            + " | ".join(_pm(s.get(short)) for short, _, _ in SETTINGS)
            + f" | {_pm(s.get('plug_in_minus_full_ft'))} | {_pm(s.get('margin'))} | "
            f"{s['verbatim_middle_tensors']}/{s['middle_tensors']} | "
            f"{'–' if share is None else f'{100 * share:.0f} %'} | "
            f"{_seconds(s['build_s']).removesuffix(' s')} | "
            + (
                f"{s['gradient_error']:.3f} | {s['loss_rise']:.2f} |"
                if "gradient_error" in s
                else "– | – |"
            )
        )
    lines += ["", *_correlation_lines(document["score_vs_plug_in"])]
    lines += _screen_lines(document.get("screen") or {}, document["cells"])
    lines += ["", "## Targets for the default", ""]
    default = document["default"]
    if default:
        lines += [
            f"The default is cell `{document['default_cell']}` (its overrides are the "
            "configuration's defaults).",
            "",
        ]
        lines += _target_lines(default)
    else:
        lines.append(f"The default (`{document['default_cell']}`) has not been measured yet.")
    lines += [
        "",
        "## Generalisation: the default (and the leading candidate) on other tasks and models",
        "",
    ]
    if document["generalisation"]:
        lines += [
            "| task | seeds | full ZS | emulator ZS | emulator FT | plug-in | full FT | margin | "
            "plug-in ≥ ZS + half the gain | margin ≥ 5 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
        ]
        for task, g in document["generalisation"].items():
            verdict = g["targets"]
            lines.append(
                f"| {task} ({g['plan']}) | {g['seeds']} | "
                + " | ".join(_pm(g.get(short)) for short, _, _ in SETTINGS)
                + f" | {_pm(g.get('margin'))} | "
                + ("met" if verdict.get("plug_in_recovers_half_the_gain") else "**missed**")
                + " | "
                + ("met" if verdict["margin_at_least_5"] else "**missed**")
                + " |"
            )
    else:
        lines.append("Not measured yet (`offsite bench emulator --generalisation`).")
    lines += [
        "",
        "## Per seed",
        "",
        "| cell | seed | full ZS | emulator ZS | emulator FT | plug-in | full FT | run s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in document["cells"].items():
        for row in s["per_seed"]:
            seed = row["seed"]
            values = " | ".join(f"{row[k]:.1f}" if k in row else "–" for k, _, _ in SETTINGS)
            wall = f"{row['wall_s']:.0f}" if row.get("wall_s") else "–"
            lines.append(f"| {name} | {seed} | {values} | {wall} |")
    lines.append("")
    return "\n".join(lines)


def _screen_lines(screen: dict[str, Any], measured: dict[str, Any]) -> list[str]:
    """The screened candidates, best gradient score first, beside their plug-in where the
    full protocol also ran: the proxy that chooses what the protocol runs next."""
    if not screen:
        return []
    lines = [
        "",
        "## Screened by the gradient score (no federation)",
        "",
        "`offsite bench emulator --screen --cells …`: each candidate's emulator built once and "
        "scored (a few minutes), before the full protocol spends ~10 minutes a seed on it. "
        "Lower gradient error is better; its rank correlation with plug-in is above.",
        "",
        "| cell | gradient error | loss rise | bundle MB | build + score s | plug-in (protocol) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in sorted(screen.items(), key=lambda item: item[1]["gradient_error"]):
        seconds = row.get("build_and_score_s")
        plug_in = _pm(measured[name]["plug_in"]) if name in measured else "not run"
        lines.append(
            f"| {name} | {row['gradient_error']:.3f} | {row['loss_rise']:.2f} "
            f"| {row['bundle_bytes'] / 2**20:.0f} | {'–' if seconds is None else seconds} "
            f"| {plug_in} |"
        )
    return lines


def _correlation_lines(correlation: dict[str, Any]) -> list[str]:
    head = (
        "Gradient error = mean over adapter blocks of 1 − cos(gradient through the emulator, "
        "through the full model) on 32 public chitchat texts (emulator/gradient_score.py), of "
        "the bundle each cell shipped; loss rise = the emulator's LM loss minus the full "
        "model's on those texts."
    )
    if "gradient_error_vs_plug_in" not in correlation:
        return [head, f"Rank correlation: {correlation['cells']} scored cells, needs ≥ 3."]
    return [
        head,
        f"Spearman ρ over {correlation['cells']} cells (identity left out): gradient error vs "
        f"plug-in {correlation['gradient_error_vs_plug_in']:+.2f}; loss rise vs plug-in "
        f"{correlation['loss_rise_vs_plug_in']:+.2f}; loss rise vs margin "
        f"{correlation['loss_rise_vs_margin']:+.2f} (negative = a lower value goes with a "
        "higher number).",
    ]


def _target_lines(default: dict[str, Any]) -> list[str]:
    gap = default.get("plug_in_minus_full_ft")
    margin = default.get("margin")
    share = default["bundle_bytes"] / default["full_model_bytes"]
    checks = [
        ("full FT − plug-in ≤ 2 points", _at_least(gap, -2), _pm(gap)),
        ("plug-in − emulator FT ≥ 5 points", _at_least(margin, 5), _pm(margin)),
        (
            "0 verbatim middle tensors",
            default["verbatim_middle_tensors"] == 0,
            str(default["verbatim_middle_tensors"]),
        ),
        ("bundle ≤ 40 % of the full model", share <= 0.40, f"{100 * share:.0f} %"),
        (
            "build ≤ 5 min",
            "unmeasured" if default["build_s"] is None else default["build_s"] <= 300,
            _seconds(default["build_s"]),
        ),
    ]
    verdicts = {
        True: "met",
        False: "**missed**",
        None: "**not resolved** (its 95 % CI crosses it)",
        "unmeasured": "**not measured** (every seed reused a cached bundle)",
    }
    return [f"- {verdicts[ok]}: {text} (measured {value})" for text, ok, value in checks]


def _seconds(value: float | None) -> str:
    """Build seconds, or a dash when every seed reused a cached bundle (no build was timed)."""
    return "–" if value is None else f"{value:.0f} s"


def _at_least(stat: dict[str, float] | None, target: float) -> bool | None:
    """Met when the whole 95 % interval is at or above ``target``, missed when the mean is
    below it, unresolved when only the interval crosses it."""
    if stat is None or stat["mean"] < target:
        return False
    ci = 0.0 if math.isnan(stat["ci95"]) else stat["ci95"]
    return True if stat["mean"] - ci >= target else None


def _plot(summaries: dict[str, Any], path: Path) -> None:
    """Plug-in against margin, marker area by bundle size: the owner's trade-off."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, s in summaries.items():
        if "plug_in" not in s:
            continue
        x, y = s["margin"], s["plug_in"]
        axis.errorbar(
            x["mean"],
            y["mean"],
            xerr=0 if math.isnan(x["ci95"]) else x["ci95"],
            yerr=0 if math.isnan(y["ci95"]) else y["ci95"],
            fmt="o",
            ms=4 + 10 * s["bundle_bytes"] / s["full_model_bytes"],
            capsize=3,
        )
        axis.annotate(
            f"{name} ({s['plan']})",
            (x["mean"], y["mean"]),
            xytext=(5, 5),
            textcoords="offset points",
            fontsize=8,
        )
        if "full_ft" in s:
            axis.axhline(s["full_ft"]["mean"], color="k", ls="--", lw=0.8)
    axis.axvline(5, color="tab:red", ls=":", lw=1, label="margin target (+5)")
    axis.set_xlabel("privacy margin: plug-in − emulator FT (points)")
    axis.set_ylabel("plug-in accuracy (%)")
    axis.set_title("Emulator transfer: mean ± 95 % CI over seeds (dashed: full FT)")
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default=",".join(CELLS), help=f"of {', '.join(CELLS)}")
    parser.add_argument(
        "--seeds",
        type=int,
        default=PROTOCOL_SEEDS,
        help=f"run seeds 0..N-1 of each cell now (the protocol plans {PROTOCOL_SEEDS}; finished "
        "runs are reused)",
    )
    parser.add_argument("--eval-size", type=int, default=500, help="held-out examples per run")
    parser.add_argument("--fresh", action="store_true", help="re-run finished runs")
    parser.add_argument(
        "--score-only",
        action="store_true",
        help="only add the gradient score to measured cells that lack it (builds their emulator)",
    )
    parser.add_argument(
        "--screen",
        action="store_true",
        help="only build and score the given cells' emulators (the cheap proxy); no federation",
    )
    parser.add_argument(
        "--generalisation",
        action="store_true",
        help=f"also run the default on {', '.join(GENERALISATION)}",
    )
    parser.add_argument(
        "--tasks", default="", help="only these generalisation entries (comma-separated)"
    )
    args = parser.parse_args()
    unknown = [c for c in args.cells.split(",") if c and c not in CELLS]
    if unknown:
        parser.error(f"unknown cells {unknown}; known: {', '.join(CELLS)}")
    tasks = [t for t in args.tasks.split(",") if t] or (
        list(GENERALISATION) if args.generalisation else []
    )
    if set(tasks) - set(GENERALISATION):
        parser.error(f"unknown tasks {sorted(set(tasks) - set(GENERALISATION))}")
    run(
        [c for c in args.cells.split(",") if c],
        args.seeds,
        args.eval_size,
        args.fresh,
        tasks,
        args.score_only,
        args.screen,
    )


if __name__ == "__main__":
    main()
