"""Choose the training recipe on tasks we never report (issue 22, item 5).

Run: offsite bench recipe [--recipes a,b] [--tasks chitchat-prompts,stdlib-docs] [--seeds 1]
     (= .venv/bin/python bench/recipe_tuning.py …)

Every (recipe, task, seed) is one real `offsite simulate` run of the default emulator (the
configuration's defaults, pinned as cells.COMPRESSED_OVERRIDES) on a tuning task of
bench/tuning_tasks.py, read as a user JSONL, with ``data.eval_size`` validation examples taken
from that task (never bbc-news or chatterbot-topics, whose held-out numbers the emulator report
states). Full fine-tuning trains the same recipe on the same data.

Per recipe and task: the five settings, the margin (plug-in − emulator FT), plug-in − full FT and
g = (plug-in − full ZS) / (best full FT − full ZS), the share of the task's best full fine-tuning
gain the plug-in keeps. "Best" is the highest full FT any recipe reached on the task: one
yardstick for all, since a recipe's own full FT would reward a learning rate that also hurts full
fine-tuning (lr 4e-3 on chitchat-prompts did). Across tasks a recipe is ranked by its worst
task's g, then its mean g: a recipe that transfers on every task beats one that is best on one
(the issue: "prefer settings that transfer across tasks over the best single-task number"). A
first pass is a one-seed screen; candidates
that lead go on to more seeds (``--seeds 3 --recipes …``) before any default changes.

Runs land in bench/out/recipe_tuning/<task>/<recipe>/seed-<s>/ and are reused; the report
bench/reports/recipe_tuning.{json,md} is rewritten after every run. A seed the committed report
already holds is not run again (bench/out is not in git; ``--fresh`` re-runs it).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

import tuning_tasks
from cells import (
    COMPRESSED_OVERRIDES,
    committed_report,
    measured_before,
    quiet_setup,
    simulate_cell,
)
from emulator_transfer import SETTINGS, _pm, five_way_stats, seed_row

ROOT = Path(__file__).resolve().parent
REPORTS = ROOT / "reports"
WORK = ROOT / "out" / "recipe_tuning"
EVAL_SIZE = 300

# name -> (overrides, what). "default" is the configuration's recipe, spelled out so the rows keep
# their meaning if the defaults move; every other candidate changes one thing and keeps the
# federation's compute (rounds x local steps x batch) except where that is the point.
RECIPES: dict[str, tuple[tuple[str, ...], str]] = {
    "default": (
        (
            "train.lr=0.002",
            "train.lora_r=8",
            "train.lora_alpha=16",
            "train.local_steps=10",
            "federation.rounds=3",
        ),
        "LoRA r 8, alpha 16, lr 2e-3, 3 rounds x 10 local steps (chosen on bbc-news)",
    ),
    "lr1e-3": (("train.lr=0.001",), "half the learning rate"),
    "lr4e-3": (("train.lr=0.004",), "twice the learning rate"),
    "rounds6-steps5": (
        ("federation.rounds=6", "train.local_steps=5"),
        "the same steps in 6 rounds of 5 (more averaging, less client drift)",
    ),
    "r16": (("train.lora_r=16", "train.lora_alpha=32"), "LoRA rank 16 (alpha 32: same scale)"),
}


def overrides_for(recipe: str, task: str, seed: int, data_path: Path) -> list[str]:
    """The run's overrides: the default emulator, the task's file and template, the recipe."""
    base = RECIPES["default"][0]
    return [
        f"seed={seed}",
        f"data.name='{data_path}'",
        "data.template=" + json.dumps(tuning_tasks.TEMPLATES[task]),  # a TOML basic string
        f"data.eval_size={EVAL_SIZE}",
        "eval.full_finetune=true",
        *COMPRESSED_OVERRIDES,
        *base,
        *RECIPES[recipe][0],
    ]


def ceilings(report: dict[str, Any]) -> dict[str, float]:
    """Per task, the best full fine-tuning any recipe reached (mean over its seeds): one yardstick
    for every recipe, so a recipe cannot look better by also hurting full fine-tuning."""
    return {
        task: max(cell["full_ft"]["mean"] for cell in recipes.values())
        for task, recipes in report["results"].items()
    }


def gain_kept(cell: dict[str, Any], ceiling: float) -> float:
    """The share of the task's best full fine-tuning gain over zero-shot the plug-in keeps."""
    gain = ceiling - cell["full_zs"]["mean"]
    return (cell["plug_in"]["mean"] - cell["full_zs"]["mean"]) / gain if gain > 0 else math.nan


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One (recipe, task) over its seeds: the protocol's statistics and the rows."""
    return {"seeds": len(rows), **five_way_stats(rows), "per_seed": rows}


def rank(report: dict[str, Any], tasks: list[str]) -> list[dict[str, Any]]:
    """Recipes measured on every task, best first: worst task's g, then mean g."""
    best = ceilings(report)
    ranked = []
    for recipe in RECIPES:
        cells = [report["results"].get(task, {}).get(recipe) for task in tasks]
        if not all(cells):
            continue
        gains = [gain_kept(c, best[t]) for t, c in zip(tasks, cells, strict=True)]
        ranked.append(
            {
                "recipe": recipe,
                "worst_gain_kept": min(gains),
                "mean_gain_kept": statistics.fmean(gains),
                "mean_plug_in": statistics.fmean(c["plug_in"]["mean"] for c in cells),
                "mean_margin": statistics.fmean(c["margin"]["mean"] for c in cells),
                "mean_plug_in_minus_full_ft": statistics.fmean(
                    c["plug_in_minus_full_ft"]["mean"] for c in cells
                ),
                "seeds": min(c["seeds"] for c in cells),
            }
        )
    return sorted(ranked, key=lambda r: (-r["worst_gain_kept"], -r["mean_gain_kept"]))


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Recipe tuning on tasks we never report (issue 22, item 5)",
        "",
        "Written by `offsite bench recipe` (bench/recipe_tuning.py). The default emulator "
        f"(1-26-3, fisher-svd 43 %, int8) on tuning tasks built from installed packages "
        f"(bench/tuning_tasks.py; Python {report['python']}), {EVAL_SIZE} validation examples "
        "per run, never bbc-news or chatterbot-topics. Percent; mean ± 95 % CI where a cell "
        "has several seeds, else one seed (a screen, not a conclusion). g = the share of the "
        "task's best full fine-tuning gain over zero-shot (the highest full FT any recipe "
        "reached: one yardstick for all) that the plug-in keeps.",
        "",
        "| task | recipe | seeds | full ZS | emulator ZS | emulator FT | plug-in | full FT "
        "| plug-in − full FT | margin | g |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    best = ceilings(report)
    for task, recipes in report["results"].items():
        for recipe, cell in recipes.items():
            cols = [_pm(cell.get(short)) for short, _, _ in SETTINGS]
            lines.append(
                f"| {task} | {recipe} | {cell['seeds']} | " + " | ".join(cols) + " | "
                f"{_pm(cell['plug_in_minus_full_ft'])} | {_pm(cell['margin'])} | "
                f"{100 * gain_kept(cell, best[task]):.0f} % |"
            )
    lines += [
        "",
        "## Recipes across tasks",
        "",
        "Ranked by the worst task's g, then the mean g (recipes measured on every task). "
        "Rows with different seed counts do not compare: seeds move a task by up to 11 points "
        "(stdlib-docs, default: 45.3 and 56.3), so a one-seed row is a screen.",
        "",
        "| recipe | what | seeds | worst g | mean g | mean plug-in | mean margin "
        "| mean plug-in − full FT |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["ranking"]:
        lines.append(
            f"| {r['recipe']} | {RECIPES[r['recipe']][1]} | {r['seeds']} | "
            f"{100 * r['worst_gain_kept']:.0f} % | {100 * r['mean_gain_kept']:.0f} % | "
            f"{r['mean_plug_in']:.1f} | "
            f"{r['mean_margin']:+.1f} | {r['mean_plug_in_minus_full_ft']:+.1f} |"
        )
    return "\n".join(lines) + "\n"


def save(report: dict[str, Any]) -> None:
    REPORTS.mkdir(parents=True, exist_ok=True)
    (REPORTS / "recipe_tuning.json").write_text(json.dumps(report, indent=1))
    (REPORTS / "recipe_tuning.md").write_text(markdown(report))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--recipes",
        default=",".join(RECIPES),
        help=f"comma-separated candidates (default: all of {', '.join(RECIPES)})",
    )
    parser.add_argument(
        "--tasks",
        default=",".join(tuning_tasks.BUILDERS),
        help=f"comma-separated tuning tasks (default: {', '.join(tuning_tasks.BUILDERS)})",
    )
    parser.add_argument(
        "--seeds", type=int, default=1, help="seeds per (recipe, task): 1 screens, 3 decides"
    )
    parser.add_argument("--fresh", action="store_true", help="re-run finished runs")
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite the report from finished runs"
    )
    args = parser.parse_args()
    recipes = [r for r in args.recipes.split(",") if r]
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = sorted(set(recipes) - set(RECIPES)) + sorted(set(tasks) - set(tuning_tasks.BUILDERS))
    if unknown:
        parser.error(f"unknown recipes or tasks {unknown}; recipes: {', '.join(RECIPES)}")
    quiet_setup()
    paths = {task: tuning_tasks.write_task(task, WORK / "tasks") for task in tasks}
    report: dict[str, Any] = {
        "python": tuning_tasks.python_version(),
        "eval_size": EVAL_SIZE,
        "recipes": {name: list(o) for name, (o, _) in RECIPES.items()},
        "results": {},
    }
    if args.report_only:
        _collect(report, tasks, recipes)
        save(report)
        return
    committed = _committed_rows()
    for seed in range(args.seeds):  # seed-major: a stopped run leaves every recipe comparable
        for recipe in recipes:
            for task in tasks:
                run_dir = WORK / task / recipe / f"seed-{seed}"
                if measured_before(seed in committed.get((task, recipe), {}), run_dir, args.fresh):
                    continue  # measured before, its row is in the committed report
                overrides = overrides_for(recipe, task, seed, paths[task])
                try:
                    simulate_cell(run_dir, overrides, args.fresh)
                except Exception as err:  # record and go on to the next run
                    print(f"{task}/{recipe}/seed-{seed} failed: {err}")
                _collect(report, tasks, recipes)
                save(report)
                print(markdown(report).split("## Recipes across tasks")[1])


def _collect(report: dict[str, Any], tasks: list[str], recipes: list[str]) -> None:
    """Every finished run, summarized: the seeds the committed report already holds (bench/out is
    not in git: a fresh checkout has none of the runs behind it) updated by the run folders on
    disk. Recipes and tasks not asked for this time keep their rows."""
    from coordinator.state.folder import RunFolder

    seeds = _committed_rows()
    for task in tasks:
        for recipe in recipes:
            for folder in sorted((WORK / task / recipe).glob("seed-*")):  # every seed on disk
                path = RunFolder(folder).metrics_path
                if path.is_file():
                    metrics = json.loads(path.read_text())
                    if not metrics["run"].get("failed") and "full_fine_tuned" in metrics["scores"]:
                        seed = int(folder.name[5:])
                        seeds.setdefault((task, recipe), {})[seed] = {
                            "seed": seed,
                            **seed_row(metrics),
                        }
    results: dict[str, Any] = {}
    for task in [*tasks, *sorted({t for t, _ in seeds} - set(tasks))]:
        for recipe in RECIPES:
            rows = [seeds[task, recipe][s] for s in sorted(seeds.get((task, recipe), {}))]
            if rows:
                results.setdefault(task, {})[recipe] = summarize(rows)
    report["results"] = results
    report["ranking"] = rank(report, sorted(results))


def _committed_rows() -> dict[tuple[str, str], dict[int, dict[str, Any]]]:
    """Per (task, recipe), the per-seed rows the committed report holds."""
    results = committed_report(REPORTS / "recipe_tuning.json").get("results", {})
    return {
        (task, recipe): {row["seed"]: row for row in cell["per_seed"]}
        for task, cells in results.items()
        for recipe, cell in cells.items()
        if recipe in RECIPES
    }


if __name__ == "__main__":
    main()
