"""Does the gradient-preservation score predict plug-in accuracy? A cheap screen of emulators.

Run: .venv/bin/python bench/gradient_score.py

Every undistilled emulator cell of bench/reports/emulator.json (SmolLM2-135M, bbc-news: uniform
or cosine selection, fp32/int8/int4, 2-4-2 to 2-16-2) is rebuilt exactly as that benchmark built
it and scored with emulator.gradient_score on public calibration text (chitchat, never the task):
the adapter blocks' LM-loss gradients through the emulator against those through the full model.
The report puts the score beside each cell's measured plug-in accuracy and gives the Spearman
rank correlation, next to the correlation of the perplexity ratio (the gate's current proxy).

Those plug-in numbers are single-seed on 150 held-out examples (one example = 0.67 points):
this is a screen, not the issue's protocol. Cells are cached in bench/reports/gradient_score.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
REPORTS = ROOT / "reports"
CACHE = REPORTS / "gradient_score.json"
TEXTS = 32  # calibration texts (after the perplexity gate's held-out ones)
MAX_LENGTH = 128


def _spearman(xs: list[float], ys: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(xs, ys).statistic)


def run() -> dict[str, Any]:
    from coordinator.models import load_full_model
    from emulator.batches import text_batches
    from emulator.build import public_texts, quantize_emulator
    from emulator.gradient_score import full_reference_gradients, score_emulator
    from emulator.layers import plan_layers
    from emulator.selection import block_change_scores, select_by_change
    from emulator.split import build_emulator
    from offsite.config import load_config

    rows = json.loads((REPORTS / "emulator.json").read_text())["rows"]
    cells = [r for r in rows if not r["distilled"]]
    results: dict[str, Any] = json.loads(CACHE.read_text()) if CACHE.is_file() else {}
    model, tokenizer, arch, _ = load_full_model("smollm2-135m")
    settings = load_config(None, []).emulator
    texts = public_texts(settings.public_text, settings.public_examples + TEXTS)
    calibration = texts[settings.public_examples :]
    batches = text_batches(tokenizer, calibration, MAX_LENGTH, 8)
    change = block_change_scores(model, tokenizer, texts[: settings.public_examples])
    references: dict[int, Any] = {}
    for cell in cells:
        if cell["cell"] in results:
            continue
        start = time.perf_counter()
        keep = int(cell["kept_middle"])
        plan = plan_layers(30, 2, 2, keep)
        if cell["selection"] == "cosine":
            plan = select_by_change(plan, change, keep)
        emulator = build_emulator(model, plan, arch)
        if cell["precision"] != "fp32":
            quantized = settings.__class__(keep=keep, quantize=cell["precision"])
            quantize_emulator(emulator, plan, arch, tokenizer, texts[64 : 64 + 64], quantized)
        if 0 not in references:  # the adapter blocks (2 + 2) are the same for every cell
            references[0] = full_reference_gradients(model, plan, arch, batches)
        score = score_emulator(model, emulator, plan, arch, batches, references[0])
        results[cell["cell"]] = {
            **score.to_dict(),
            "plug_in": cell["plug_in"],
            "emulator_fine_tuned": cell["emulator_fine_tuned"],
            "perplexity_ratio": cell["perplexity_ratio"],
            "seconds": time.perf_counter() - start,
        }
        print(cell["cell"], f"{score.gradient_error:.4f}", cell["plug_in"], flush=True)
        _save(results)
    return results


def _save(results: dict[str, Any]) -> None:
    REPORTS.mkdir(exist_ok=True)
    CACHE.write_text(json.dumps(results, indent=1))
    (REPORTS / "gradient_score.md").write_text(_markdown(results))


def _relative(result: dict[str, Any]) -> float:
    blocks = result["per_block"].values()
    return sum(b["relative_error"] for b in blocks) / len(blocks)


def _markdown(results: dict[str, Any]) -> str:
    names = sorted(results, key=lambda n: results[n]["gradient_error"])
    lines = [
        "# Gradient-preservation score vs measured plug-in (screen)",
        "",
        "`python bench/gradient_score.py`: every undistilled cell of `emulator.md` (SmolLM2-135M, "
        "bbc-news, single seed, 150 held-out) rebuilt and scored on 32 chitchat texts × 128 "
        "tokens. gradient error = mean over adapter blocks of 1 − cos(g_emu, g_full); rel. "
        "error = mean ‖g_emu − g_full‖ / ‖g_full‖.",
        "",
        "| cell | gradient error | rel. error | loss rise | ppl ratio | plug-in % | emu FT % "
        "| score s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        r = results[name]
        lines.append(
            f"| {name} | {r['gradient_error']:.3f} | {_relative(r):.2f} | {r['loss_rise']:.2f} | "
            f"{r['perplexity_ratio']:.0f} | {r['plug_in']:.1f} | {r['emulator_fine_tuned']:.1f} "
            f"| {r['seconds']:.0f} |"
        )
    if len(names) >= 3:
        plug = [results[n]["plug_in"] for n in names]
        lines += [
            "",
            f"Spearman ρ over {len(names)} cells: gradient error vs plug-in "
            f"{_spearman([results[n]['gradient_error'] for n in names], plug):+.2f}; "
            f"perplexity ratio vs plug-in "
            f"{_spearman([results[n]['perplexity_ratio'] for n in names], plug):+.2f}; "
            f"loss rise vs plug-in "
            f"{_spearman([results[n]['loss_rise'] for n in names], plug):+.2f}; "
            f"mean relative error vs plug-in "
            f"{_spearman([_relative(results[n]) for n in names], plug):+.2f} "
            "(negative = a lower value predicts a better plug-in).",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # --help
    _save(run())
