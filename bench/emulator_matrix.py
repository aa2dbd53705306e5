"""Benchmark emulator construction: layer choice × distillation × weight precision, and size.

Run: make bench-emulator   (= .venv/bin/python bench/emulator_matrix.py)

Every cell is one real `offsite simulate` run on the embedded default (SmolLM2-135M, bbc-news,
4 non-IID clients, 3 rounds) that differs only in how the emulator is built:

- matrix at 2-<keep>-2: selection {uniform, cosine} × {plain drop, distilled} × {fp32, int8, int4}
- size sweep (uniform, fp32): kept middle blocks {sizes} × {plain drop, distilled}
- the first cell also trains the same adapter recipe on the full model (the fifth setting), the
  bar the plug-in is measured against.

Distillation runs once per (selection, size): the quantized cells reuse its finished checkpoint
(`emulator.distill_checkpoint`), so their build time excludes it; the distillation time is its
own column. Runs land in bench/out/emulator/<cell>/ and a finished cell is not re-run (delete it,
or pass --fresh). The report (bench/reports/emulator.{json,md,png}) is rewritten after every
cell, so an interrupted benchmark still reports what it measured.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cells import quiet_setup, simulate_cell

ROOT = Path(__file__).resolve().parent
REPORTS = ROOT / "reports"
WORK = ROOT / "out" / "emulator"


@dataclass(frozen=True)
class Cell:
    selection: str
    distill: bool
    precision: str  # "fp32" | "int8" | "int4"
    keep: int
    baseline: bool = False

    @property
    def name(self) -> str:
        kind = "distilled" if self.distill else "plain"
        return f"{self.selection}-{kind}-{self.precision}-keep{self.keep}"

    def overrides(self, steps: int) -> list[str]:
        quantize = "none" if self.precision == "fp32" else self.precision
        out = [
            f"emulator.keep={self.keep}",
            f"emulator.selection='{self.selection}'",
            f"emulator.distill={str(self.distill).lower()}",
            f"emulator.quantize='{quantize}'",
            f"emulator.distill_steps={steps}",
        ]
        if self.distill:
            checkpoint = WORK / f"distill-{self.selection}-keep{self.keep}"
            out.append(f"emulator.distill_checkpoint='{checkpoint}'")
        if self.baseline:
            out.append("eval.full_finetune=true")
        return out


def plan_cells(keep: int, sizes: list[int]) -> list[Cell]:
    """Every cell, most informative first (the report is rewritten after each one)."""
    others = [size for size in sizes if size != keep]
    cells = [
        Cell("uniform", False, "fp32", keep, baseline=True),
        *(Cell("uniform", True, precision, keep) for precision in ("fp32", "int8", "int4")),
        *(Cell("uniform", False, "fp32", size) for size in others),
        Cell("cosine", False, "fp32", keep),
        Cell("cosine", True, "fp32", keep),
        *(Cell("uniform", True, "fp32", size) for size in others),
        *(Cell("uniform", False, precision, keep) for precision in ("int8", "int4")),
    ]
    cells += [
        Cell("cosine", distill, precision, keep)
        for distill in (False, True)
        for precision in ("int8", "int4")
    ]
    return cells


def run_cell(cell: Cell, steps: int, fresh: bool) -> dict[str, Any]:
    return row(cell, simulate_cell(WORK / cell.name, cell.overrides(steps), fresh))


def row(cell: Cell, metrics: dict[str, Any]) -> dict[str, Any]:
    run, scores, timings = metrics["run"], metrics["scores"], metrics["timings"]
    privacy, compression = run.get("privacy", {}), run.get("compression", {})
    distilled = compression.get("distilled") or {}
    quantization = compression.get("quantization") or {}
    federated = timings.get("federated training (Flower simulation)", 0.0)
    return {
        "cell": cell.name,
        "selection": cell.selection,
        "distilled": cell.distill,
        "precision": cell.precision,
        "kept_middle": cell.keep,
        "plan": run["plan"],
        **{key: 100 * value["value"] for key, value in scores.items()},
        "emulator_perplexity": privacy.get("emulator_perplexity"),
        "full_perplexity": privacy.get("full_perplexity"),
        "perplexity_ratio": privacy.get("perplexity_ratio"),
        "middle_verbatim": f"{privacy.get('middle_tensors_verbatim')}/"
        f"{privacy.get('middle_tensors')}",
        "bundle_mb": run["bundle_bytes"] / 1e6,
        "build_s": timings.get("load full model and build emulator bundle"),
        "distill_s": distilled.get("seconds"),
        "distill_best_step": distilled.get("best_step"),
        "quant_mean_relative_error": quantization.get("mean_relative_error"),
        "round_s": federated / max(1, int(run["rounds"])),
        "eval_examples": run["eval_examples"],
        "run_dir": str(WORK / cell.name),
    }


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def findings(rows: list[dict[str, Any]], keep: int) -> list[str]:
    """The claims the issue asks for, computed from the rows (absent cells say so)."""
    by = {(r["selection"], r["distilled"], r["precision"], r["kept_middle"]): r for r in rows}
    out = []
    base = by.get(("uniform", False, "fp32", keep))
    full_ft = base.get("full_fine_tuned") if base else None
    if base and full_ft is not None:
        plain = base["plug_in"]
        distilled = [
            by[(s, True, "fp32", keep)]["plug_in"]
            for s in ("uniform", "cosine")
            if (s, True, "fp32", keep) in by
        ]
        if distilled:
            best = max(distilled)
            gap = full_ft - plain
            closed = (best - plain) / gap if gap > 0 else float("nan")
            out.append(
                f"Full-model fine-tuning (same LoRA recipe, centrally): {full_ft:.1f} %. "
                f"Undistilled uniform 2-{keep}-2 plug-in: {plain:.1f} %. Best distilled plug-in: "
                f"{best:.1f} %, closing {100 * closed:.0f} % of the gap (goal ≥ 50 %)."
            )
    for selection in ("uniform", "cosine"):
        for distill in (False, True):
            fp32 = by.get((selection, distill, "fp32", keep))
            if not fp32:
                continue
            for precision in ("int8", "int4"):
                quant = by.get((selection, distill, precision, keep))
                if quant:
                    kind = "distilled" if distill else "plain"
                    out.append(
                        f"{selection}/{kind} {precision}: plug-in {quant['plug_in']:.1f} vs fp32 "
                        f"{fp32['plug_in']:.1f} ({quant['plug_in'] - fp32['plug_in']:+.1f} "
                        f"points); emulator fine-tuned {quant['emulator_fine_tuned']:.1f} vs "
                        f"{fp32['emulator_fine_tuned']:.1f}; bundle {quant['bundle_mb']:.0f} vs "
                        f"{fp32['bundle_mb']:.0f} MB"
                    )
    for distill in (False, True):
        pair = [by.get((s, distill, "fp32", keep)) for s in ("uniform", "cosine")]
        if all(pair):
            kind = "distilled" if distill else "plain"
            out.append(
                f"{kind} 2-{keep}-2, cosine vs uniform selection: plug-in "
                f"{pair[1]['plug_in']:.1f} vs {pair[0]['plug_in']:.1f}, emulator perplexity "
                f"{_fmt(pair[1]['emulator_perplexity'])} vs {_fmt(pair[0]['emulator_perplexity'])}"
            )
    return out


COLUMNS = [
    ("cell", "cell"),
    ("emulator_perplexity", "emu ppl"),
    ("perplexity_ratio", "ppl ratio"),
    ("full_zero_shot", "full ZS"),
    ("emulator_zero_shot", "emu ZS"),
    ("emulator_fine_tuned", "emu FT"),
    ("plug_in", "plug-in"),
    ("full_fine_tuned", "full FT"),
    ("bundle_mb", "bundle MB"),
    ("middle_verbatim", "verbatim"),
    ("build_s", "build s"),
    ("distill_s", "distill s"),
    ("round_s", "round s"),
]


def write_reports(rows: list[dict[str, Any]], keep: int, meta: dict[str, Any]) -> None:
    REPORTS.mkdir(parents=True, exist_ok=True)
    facts = findings(rows, keep)
    (REPORTS / "emulator.json").write_text(
        json.dumps({"meta": meta, "findings": facts, "rows": rows}, indent=1)
    )
    lines = [
        "# Emulator benchmark",
        "",
        f"Generated {meta['finished']} by `{meta['command']}` in {meta['minutes']:.0f} min. "
        f"Model {meta['model']}, task {meta['task']}: each cell is one federated run "
        f"({meta['federation']}), scored on the same {rows[0]['eval_examples'] if rows else '?'} "
        "held-out articles (accuracy %, one example = "
        f"{100 / rows[0]['eval_examples'] if rows else 0:.2f} points). Emulator perplexity is on "
        "held-out public text (chitchat); ratio = emulator ÷ full model.",
        "",
        "## Findings",
        "",
        *[f"- {fact}" for fact in facts],
        "",
        "## All cells",
        "",
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(key)) for key, _ in COLUMNS) + " |")
    lines += [
        "",
        "![accuracy per cell and against emulator size](emulator.png)",
        "",
        "Reproduce: `make bench-emulator` (finished cells in bench/out/emulator are reused; "
        "`--fresh` re-runs them).",
    ]
    (REPORTS / "emulator.md").write_text("\n".join(lines) + "\n")
    plot(rows, keep, REPORTS / "emulator.png")


def plot(rows: list[dict[str, Any]], keep: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = [r for r in rows if r["kept_middle"] == keep]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [3, 2]})
    labels = [
        f"{r['selection'][:3]}/{'dist' if r['distilled'] else 'plain'}\n{r['precision']}"
        for r in matrix
    ]
    xs = range(len(matrix))
    width = 0.4
    left.bar([x - width / 2 for x in xs], [r["plug_in"] for r in matrix], width, label="plug-in")
    left.bar(
        [x + width / 2 for x in xs],
        [r["emulator_fine_tuned"] for r in matrix],
        width,
        label="emulator fine-tuned",
    )
    for r in matrix:
        if r.get("full_fine_tuned") is not None:
            left.axhline(r["full_fine_tuned"], color="k", ls="--", lw=1, label="full fine-tuned")
        if r.get("full_zero_shot") is not None:
            left.axhline(r["full_zero_shot"], color="grey", ls=":", lw=1, label="full zero-shot")
            break
    left.set_xticks(list(xs), labels, fontsize=8)
    left.set_ylabel("accuracy on held-out bbc-news (%)")
    left.set_title(f"2-{keep}-2 emulator: selection × distillation × precision")
    left.legend(fontsize=8, loc="lower right")
    left.set_ylim(0, 100)

    for distill, color in ((False, "tab:red"), (True, "tab:green")):
        series = sorted(
            (
                r
                for r in rows
                if r["selection"] == "uniform" and r["precision"] == "fp32"
                if r["distilled"] == distill
            ),
            key=lambda r: r["kept_middle"],
        )
        if not series:
            continue
        sizes = [r["kept_middle"] for r in series]
        kind = "distilled" if distill else "plain drop"
        accuracy = [r["plug_in"] for r in series]
        right.plot(sizes, accuracy, "o-", color=color, label=f"plug-in, {kind}")
        right.plot(
            sizes,
            [r["emulator_fine_tuned"] for r in series],
            "s--",
            color=color,
            alpha=0.6,
            label=f"emulator FT, {kind}",
        )
    right.set_xlabel("kept middle blocks (of 26)")
    right.set_ylabel("accuracy (%)")
    right.set_title("accuracy against emulator size (uniform, fp32)")
    right.set_ylim(0, 100)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=int, default=8, help="Kept middle blocks of the matrix.")
    parser.add_argument(
        "--sizes", default="4,8,16", help="Kept middle blocks of the size sweep (comma list)."
    )
    parser.add_argument("--distill-steps", type=int, default=200)
    parser.add_argument("--only", default="", help="Run only cells whose name contains this.")
    parser.add_argument("--fresh", action="store_true", help="Re-run finished cells.")
    args = parser.parse_args()
    quiet_setup()
    from offsite.config import OffsiteConfig

    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    cells = [c for c in plan_cells(args.keep, sizes) if args.only in c.name]
    defaults = OffsiteConfig()
    meta = {
        "command": "python bench/emulator_matrix.py "
        + " ".join(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if v),
        "model": defaults.model.name,
        "task": defaults.data.name,
        "federation": f"{defaults.federation.num_clients} clients, "
        f"{defaults.federation.rounds} rounds, {defaults.train.local_steps} local steps",
        "distill_steps": args.distill_steps,
    }
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for index, cell in enumerate(cells, 1):
        print(f"\n=== cell {index}/{len(cells)}: {cell.name} ===", flush=True)
        rows.append(run_cell(cell, args.distill_steps, args.fresh))
        meta["finished"] = time.strftime("%Y-%m-%d %H:%M")
        meta["minutes"] = (time.perf_counter() - start) / 60
        write_reports(rows, args.keep, meta)
    print(f"\nreport: {REPORTS / 'emulator.md'}")


if __name__ == "__main__":
    main()
