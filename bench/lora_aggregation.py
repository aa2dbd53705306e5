"""Exact vs naive LoRA aggregation: plug-in accuracy per mode, at 16 and 100 clients per round.

Run: offsite bench exact-lora [--populations 16,100] [--local-steps 3] [--seeds 3]
     [--eval-size 500] [--report-only]
     (= .venv/bin/python bench/lora_aggregation.py …)

Every (population, mode, seed) is one real `offsite simulate` run of the default task
(SmolLM2-135M, bbc-news, the 2-26-2 default emulator of 2026-12-06 pinned by
``COMPRESSED_2_26_2_OVERRIDES``, 3 rounds, Dirichlet non-IID shares) with ``data.eval_size``
held-out examples and every client sampled each round. The modes
(federation.lora_aggregation / train.adapter):

- ``naive``: LoRA, A and B averaged separately (mean(B)·mean(A) ≠ mean(B·A));
- ``merge-exact``: each client's B·A averaged and folded into the adapter blocks' weights, a
  fresh LoRA every round (exact);
- ``frozen-a``: ``lora-fa``, A frozen at its seeded start and only B trained (exact).

Every client runs ``--local-steps`` (3) steps per round at every population, the same work per
client (a 16-client round is 48 client-steps, near the default run's 4 × 10; at 100 clients
each holds ~17 training examples). Full fine-tuning is not run (the comparison is between modes
on the same emulator); full zero-shot comes from the baseline cache. Reported per cell: mean ±
95 % CI (Student t over seeds) of plug-in, emulator fine-tuned and full zero-shot; each exact
mode's paired difference from naive per seed; the measured aggregation error
‖mean(B)mean(A) − mean(BA)‖ / ‖mean(BA)‖ of every round.

Runs land in bench/out/lora_aggregation/<clients>x<local steps>/<mode>/seed-<s>/; finished
runs are reused (it can stop at any time and resume); the report
(bench/reports/lora_aggregation.{json,md,png}) covers every finished run there and is
rewritten after every run. bench/out is not in git: the seeds the committed report holds are
kept, and not run again, on a checkout without their run folders (``--fresh`` re-runs them).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

from cells import (
    COMPRESSED_2_26_2_OVERRIDES,
    LORA_MODES,
    committed_report,
    measured_before,
    quiet_setup,
    simulate_cell,
)
from emulator_transfer import _pm, mean_ci

from coordinator.state.folder import RunFolder
from offsite.errors import OffsiteError

ROOT = Path(__file__).resolve().parent
REPORTS = ROOT / "reports"
WORK = ROOT / "out" / "lora_aggregation"

MODES = LORA_MODES
LOCAL_STEPS = 3  # per client and round, at every population


def setting(population: int, steps: int) -> str:
    """A population and its local steps, as run folders and the report name them."""
    return f"{population}x{steps}"


def overrides(population: int, steps: int, mode: str, seed: int, eval_size: int) -> list[str]:
    return [
        *COMPRESSED_2_26_2_OVERRIDES,  # the emulator every finished row was measured on
        *MODES[mode],
        f"federation.num_clients={population}",
        "federation.fraction_train=1.0",
        f"train.local_steps={steps}",
        "eval.full_finetune=false",
        f"data.eval_size={eval_size}",
        f"seed={seed}",
    ]


def seed_row(metrics: dict[str, Any]) -> dict[str, Any]:
    scores = metrics["scores"]
    outcomes = [o for o in metrics.get("outcomes", []) if o.get("round", 0) > 0]
    errors = [o["lora_product_error"] for o in outcomes if "lora_product_error" in o]
    return {
        "plug_in": 100 * scores["plug_in"]["value"],
        "emu_ft": 100 * scores["emulator_fine_tuned"]["value"],
        "full_zs": 100 * scores["full_zero_shot"]["value"],
        "lora_product_error": errors,
        "failed_rounds": sum(not o["outcome"].startswith("aggregated") for o in outcomes),
        "wall_s": metrics.get("bench_wall_seconds"),
    }


def summarize(rows: dict[int, dict[str, Any]], naive: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """One (population, mode) over its seeds; the paired difference from naive per seed."""
    out: dict[str, Any] = {"seeds": sorted(rows)}
    for key in ("plug_in", "emu_ft", "full_zs"):
        out[key] = mean_ci([row[key] for row in rows.values()])
    paired = [rows[s]["plug_in"] - naive[s]["plug_in"] for s in rows if s in naive]
    if paired:
        out["plug_in_minus_naive"] = mean_ci(paired)
    errors = [e for row in rows.values() for e in row["lora_product_error"]]
    if errors:
        out["lora_product_error"] = {
            "mean": statistics.fmean(errors),
            "max": max(errors),
            "per_round": [row["lora_product_error"] for _, row in sorted(rows.items())],
        }
    walls = [r["wall_s"] for r in rows.values() if r["wall_s"]]
    out["wall_s"] = statistics.fmean(walls) if walls else math.nan
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Exact vs naive LoRA aggregation",
        "",
        f"Written by `offsite bench exact-lora` (bench/lora_aggregation.py) on "
        f"{report['written']}. Default task and emulator, {report['eval_size']} held-out "
        "examples, 3 rounds, every client sampled each round; a setting is clients × local "
        "steps per client and round. Mean ± 95 % CI over the seeds finished (Student t); "
        "the difference from naive is paired per seed. Percent.",
        "",
        "| clients × steps | mode | seeds | full ZS | emulator FT | plug-in | plug-in − naive "
        "| ‖mean(B)mean(A) − mean(BA)‖/‖mean(BA)‖, mean (max) over rounds | run s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for population, modes in report["cells"].items():
        for mode, cell in modes.items():
            error = cell.get("lora_product_error")
            shown = f"{error['mean']:.3f} (max {error['max']:.3f})" if error else "–"
            lines.append(
                f"| {population} | {mode} | {len(cell['seeds'])} | {_pm(cell['full_zs'])} "
                f"| {_pm(cell['emu_ft'])} | {_pm(cell['plug_in'])} "
                f"| {_pm(cell.get('plug_in_minus_naive')) if mode != 'naive' else ''} "
                f"| {shown} | {cell['wall_s']:.0f} |"
            )
    lines += [
        "",
        "The error column is measured on each round's accepted updates: what naive averaging "
        "makes of them (naive applies it; merge-exact measures it and applies the exact mean; "
        "under frozen-a every client shares A, so it is 0 up to rounding).",
    ]
    lines += [
        "",
        "## Per seed",
        "",
        "| clients × steps | mode | seed | plug-in | emulator FT | error per round "
        "| failed rounds |",
        "|---:|---|---:|---:|---:|---|---:|",
    ]
    for population, modes in report["rows"].items():
        for mode, seeds in modes.items():
            for seed, row in seeds.items():
                errors = ", ".join(f"{e:.3f}" for e in row["lora_product_error"]) or "–"
                lines.append(
                    f"| {population} | {mode} | {seed} | {row['plug_in']:.1f} "
                    f"| {row['emu_ft']:.1f} | {errors} | {row['failed_rounds']} |"
                )
    lines += ["", "## Reading", "", *findings(report)]
    if report["failures"]:
        lines += ["", "## Failed runs", ""]
        lines += [f"- {run}: {error}" for run, error in report["failures"].items()]
    lines += ["", "![plug-in accuracy per mode and population](lora_aggregation.png)", ""]
    return "\n".join(lines)


def findings(report: dict[str, Any]) -> list[str]:
    """Plain-language reading computed from the cells: each exact mode against naive."""
    out = []
    for population, modes in report["cells"].items():
        naive = modes.get("naive")
        error = naive.get("lora_product_error") if naive else None
        if error:
            out.append(
                f"- {population}: naive averaging's product error is "
                f"{100 * error['mean']:.1f} % on average (largest {100 * error['max']:.1f} %) "
                "of the norm of the exact mean product mean(B·A)."
            )
        for mode, cell in modes.items():
            paired = cell.get("plug_in_minus_naive")
            if mode == "naive" or not paired or math.isnan(paired["ci95"]):
                continue
            low, high = paired["mean"] - paired["ci95"], paired["mean"] + paired["ci95"]
            verdict = (
                "better than naive"
                if low > 0
                else "worse than naive"
                if high < 0
                else "not distinguishable from naive"
            )
            out.append(
                f"- {population}, {mode}: plug-in {paired['mean']:+.1f} points against "
                f"naive (95 % CI {low:+.1f} to {high:+.1f}, {len(cell['seeds'])} seeds): "
                f"{verdict} at this budget."
            )
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    populations = list(report["cells"])
    width = 0.8 / len(MODES)
    for index, mode in enumerate(MODES):
        xs, ys, errs = [], [], []
        for position, population in enumerate(populations):
            cell = report["cells"][population].get(mode)
            if cell:
                xs.append(position + (index - 1) * width)
                ys.append(cell["plug_in"]["mean"])
                ci = cell["plug_in"]["ci95"]
                errs.append(0.0 if math.isnan(ci) else ci)
        ax.bar(xs, ys, width, yerr=errs, capsize=3, label=mode)
    ax.set_xticks(range(len(populations)), [f"{p} (clients × steps)" for p in populations])
    ax.set_ylabel("plug-in accuracy (%)")
    ax.set_title("LoRA aggregation: plug-in accuracy (mean ± 95 % CI over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--populations", default="16,100", help="Clients per round, e.g. 16,100")
    parser.add_argument("--modes", default=",".join(MODES), help="Comma-separated modes.")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument(
        "--local-steps", type=int, default=LOCAL_STEPS, help="Per client and round."
    )
    parser.add_argument("--eval-size", type=int, default=500)
    parser.add_argument("--fresh", action="store_true", help="Re-run finished runs.")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="Rewrite the report from the finished runs; run nothing.",
    )
    args = parser.parse_args()
    quiet_setup()
    populations = [int(p) for p in args.populations.split(",") if p]
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}; choose from {list(MODES)}")
    failures: dict[str, str] = {}  # runs that failed in this invocation, with the error

    def save() -> None:
        rows = finished_rows()
        cells: dict[str, dict[str, Any]] = {}
        for name, by_mode in rows.items():
            naive = {int(s): r for s, r in by_mode.get("naive", {}).items()}
            cells[name] = {
                mode: summarize({int(s): r for s, r in seeds.items()}, naive)
                for mode, seeds in by_mode.items()
                if seeds
            }
        report = {
            "written": time.strftime("%Y-%m-%d %H:%M"),
            "eval_size": args.eval_size,
            "cells": cells,
            "rows": rows,
            "failures": failures,
        }
        REPORTS.mkdir(parents=True, exist_ok=True)
        (REPORTS / "lora_aggregation.json").write_text(json.dumps(report, indent=1))
        (REPORTS / "lora_aggregation.md").write_text(markdown(report))
        plot(report, REPORTS / "lora_aggregation.png")

    if args.report_only:
        save()
        return
    committed = committed_rows()
    # seed-major: a session that stops early leaves whole seeds across the modes
    for population in populations:
        name = setting(population, args.local_steps)
        for seed in range(args.seeds):
            for mode in modes:
                run_dir = WORK / name / mode / f"seed-{seed}"
                held = str(seed) in committed.get(name, {}).get(mode, {})
                if measured_before(held, run_dir, args.fresh):
                    print(f"== {name}, {mode}, seed {seed}: in the committed report", flush=True)
                    continue
                print(f"== {name}, {mode}, seed {seed}: {run_dir}", flush=True)
                try:
                    simulate_cell(
                        run_dir,
                        overrides(population, args.local_steps, mode, seed, args.eval_size),
                        args.fresh,
                    )
                except OffsiteError as err:  # one failed run does not end the sweep
                    print(f"   failed: {err}", flush=True)
                    failures[f"{name}/{mode}/seed-{seed}"] = str(err)
                save()


def committed_rows() -> dict[str, dict[str, dict[str, Any]]]:
    """The per-seed rows of the committed report, by setting, mode and seed (as strings)."""
    rows = committed_report(REPORTS / "lora_aggregation.json").get("rows", {})
    return {
        name: {mode: dict(seeds) for mode, seeds in by_mode.items() if mode in MODES}
        for name, by_mode in rows.items()
    }


def finished_rows() -> dict[str, dict[str, dict[str, Any]]]:
    """Every finished run, by setting, mode and seed, in the order of populations, then modes:
    the committed report's rows (a fresh checkout has none of the run folders behind them)
    updated by every finished run under WORK (every population and local steps ever run)."""
    found = committed_rows()
    for folder in (p for p in WORK.glob("*x*") if p.is_dir()):
        for mode in MODES:
            for run_dir in folder.glob(f"{mode}/seed-*"):
                if _finished(run_dir):
                    metrics = json.loads(RunFolder(run_dir).metrics_path.read_text())
                    by_mode = found.setdefault(folder.name, {}).setdefault(mode, {})
                    by_mode[run_dir.name[5:]] = seed_row(metrics)
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for name in sorted(found, key=lambda n: tuple(int(x) for x in n.split("x"))):
        for mode in MODES:
            if found[name].get(mode):
                seeds = found[name][mode]
                rows.setdefault(name, {})[mode] = {s: seeds[s] for s in sorted(seeds, key=int)}
    return rows


def _finished(run_dir: Path) -> bool:
    path = RunFolder(run_dir).metrics_path
    return path.is_file() and "scores" in json.loads(path.read_text())


if __name__ == "__main__":
    main()
