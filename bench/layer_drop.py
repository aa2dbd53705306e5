"""How faithful is the split, and what does each cut cost? Per catalog model that installs offline.

Run: make bench-layer-drop   (= .venv/bin/python bench/layer_drop.py [--models a,b])

For each model:
- **no-drop identity**: the emulator with every block kept, in memory and through a written and
  reloaded bundle (fp32 embeddings), against the full model: max |Δlogit| on public text;
- **perplexity per kept-block count** on the public text the privacy gate uses, for the reference
  uniform drop, the anchored uniform drop (a mixed-attention model's global layers kept first:
  the builder's default) and cosine selection;
- **bundle bytes by part** at 2-8-2 with the embeddings stored full and int8.

Cells are cached in bench/reports/layer_drop.json (a finished cell is not recomputed; --fresh
recomputes); the report (layer_drop.md) is rewritten after every cell.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent
REPORTS = ROOT / "reports"
CACHE = REPORTS / "layer_drop.json"
KEEPS = {"smollm2-135m": (22, 16, 12, 8, 6, 4, 2), "gemma3-270m": (12, 10, 8, 6, 4, 2)}


def _load(fresh: bool) -> dict[str, Any]:
    return {} if fresh or not CACHE.is_file() else json.loads(CACHE.read_text())


def _save(results: dict[str, Any]) -> None:
    REPORTS.mkdir(exist_ok=True)
    CACHE.write_text(json.dumps(results, indent=1))
    (REPORTS / "layer_drop.md").write_text(_markdown(results))


def _cell(results: dict[str, Any], model: str, key: str, compute: Any) -> Any:
    cells = results.setdefault(model, {})
    if key not in cells:
        start = time.perf_counter()
        cells[key] = compute()
        print(f"{model} {key}: {cells[key]} ({time.perf_counter() - start:.0f} s)", flush=True)
        _save(results)
    return cells[key]


def run(models: list[str], fresh: bool) -> None:
    from offsite.config import load_config

    settings = load_config(None, []).emulator
    results = _load(fresh)
    for name in models:
        _measure(name, settings, results)


def _measure(name: str, settings: Any, results: dict[str, Any]) -> None:
    """Every cell of one model (one model in memory at a time)."""
    from coordinator.models import load_full_model
    from emulator.adapter import AdapterSpec
    from emulator.arch import anchor_layers
    from emulator.build import build_bundle, public_texts
    from emulator.bundle import bundle_parts, load_bundle_model, verify_bundle
    from emulator.layers import plan_layers
    from emulator.privacy import public_text_perplexity
    from emulator.selection import block_change_scores, select_by_change
    from emulator.split import build_emulator

    model, tokenizer, arch, _ = load_full_model(name)
    layers = int(model.config.num_hidden_layers)
    texts = public_texts(settings.public_text, settings.public_examples)
    perplexity = public_text_perplexity(tokenizer, texts)
    anchors = anchor_layers(model.config, arch)
    batch = tokenizer(texts[:8], return_tensors="pt", padding=True, truncation=True, max_length=128)
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        reference = model(**batch).logits

    def bundle_of(plan: Any, scratch: str, **options: Any) -> Any:
        spec = AdapterSpec.for_plan("lora", plan, arch)
        config = settings.__class__(keep=len(plan.middle_kept), **options)
        return build_bundle(
            model, tokenizer, arch, plan, spec, Path(scratch) / "b", source=name, settings=config
        )

    def no_drop(through_bundle: bool) -> float:
        plan = plan_layers(layers, 2, 2, -1)
        emulator = build_emulator(model, plan, arch)
        if through_bundle:
            with tempfile.TemporaryDirectory() as scratch:
                bundle = bundle_of(plan, scratch, public_text="", embeddings="full")
                emulator = load_bundle_model(verify_bundle(bundle.path))
        with torch.no_grad():
            logits = emulator(**batch).logits
        return float((logits - reference)[mask].abs().max())

    def ppl_of(plan: Any) -> dict[str, Any]:
        return {
            "perplexity": perplexity(build_emulator(model, plan, arch)),
            "middle": list(plan.middle_kept),
        }

    def parts(mode: str) -> dict[str, int]:
        plan = plan_layers(layers, 2, 2, min(8, layers - 4), anchors)
        with tempfile.TemporaryDirectory() as scratch:
            return bundle_parts(bundle_of(plan, scratch, embeddings=mode).manifest)

    _cell(results, name, "layers", lambda: layers)
    _cell(results, name, "anchors", lambda: list(anchors))
    _cell(results, name, "full_perplexity", lambda: perplexity(model))
    _cell(results, name, "no_drop_dlogit_memory", lambda: no_drop(False))
    _cell(results, name, "no_drop_dlogit_bundle", lambda: no_drop(True))
    scores = None
    for keep in KEEPS.get(name, (8, 4)):
        if keep > layers - 4:
            continue
        plans = {"uniform": plan_layers(layers, 2, 2, keep)}
        if anchors:
            plans["anchored"] = plan_layers(layers, 2, 2, keep, anchors)
        if f"cosine-{keep}" not in results.get(name, {}):
            scores = scores or block_change_scores(model, tokenizer, texts)
            plans["cosine"] = select_by_change(plans["uniform"], scores, keep)
        for method, plan in plans.items():
            _cell(results, name, f"{method}-{keep}", lambda plan=plan: ppl_of(plan))
    for mode in ("full", "int8"):
        _cell(results, name, f"bundle-{mode}", lambda mode=mode: parts(mode))


def _markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Layer drop: faithfulness of the split and perplexity per cut",
        "",
        "`make bench-layer-drop` (bench/layer_drop.py). Perplexity on the privacy gate's public "
        "text (chitchat, 32 texts, 128 tokens, fp32); 2 bottom + 2 top adapter blocks.",
        "",
        "Reading (2026-12-02): the split is exact on real weights (no block dropped: max "
        "|Δlogit| 0, in memory and through a bundle). Gemma3's enormous perplexities are not an "
        "unfaithful split but its architecture: every cut that drops one of its two middle "
        "global-attention blocks (5, 11) lands at 10^7–10^10, every cut keeping both stays "
        "orders of magnitude lower; the anchored drop (now the builder's uniform default for "
        "models mixing attention types) keeps them first. Which sliding blocks are kept still "
        "moves perplexity by 10–100× (anchored-10 is worse than uniform-10, which happens to "
        "keep both); cosine selection is better at most sizes on both models.",
        "",
    ]
    for name, cells in results.items():
        lines += [f"## {name}", ""]
        if "full_perplexity" in cells:
            lines.append(
                f"- {cells.get('layers')} blocks; full-model perplexity "
                f"{cells['full_perplexity']:.1f}; global-attention (anchor) blocks: "
                f"{cells.get('anchors') or 'none (all blocks attend alike)'}"
            )
        for key, label in (
            ("no_drop_dlogit_memory", "in memory"),
            ("no_drop_dlogit_bundle", "through a written bundle"),
        ):
            if key in cells:
                lines.append(f"- no block dropped, {label}: max |Δlogit| = {cells[key]:.2e}")
        keeps = sorted(
            {
                int(k.rsplit("-", 1)[1])
                for k in cells
                if k[:1].isalpha() and k.rsplit("-", 1)[-1].isdigit() and not k.startswith("bundle")
            },
            reverse=True,
        )
        if keeps:
            lines += [
                "",
                "| kept middle | uniform (reference) | anchored (default) | cosine |",
                "|---:|---:|---:|---:|",
            ]
            for keep in keeps:
                row = [f"{keep}"]
                for method in ("uniform", "anchored", "cosine"):
                    cell = cells.get(f"{method}-{keep}")
                    row.append(
                        f"{cell['perplexity']:.3g} ({','.join(map(str, cell['middle']))})"
                        if cell
                        else "—"
                    )
                lines.append("| " + " | ".join(row) + " |")
        for mode in ("full", "int8"):
            if parts := cells.get(f"bundle-{mode}"):
                total = sum(parts.values())
                shown = ", ".join(f"{k} {v / 1e6:.1f}" for k, v in parts.items())
                lines.append(
                    f"- 2-8-2 bundle, embeddings {mode}: {total / 1e6:.1f} MB ({shown} MB)"
                )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--fresh", action="store_true", help="Recompute every cell.")
    args = parser.parse_args()
    run([m.strip() for m in args.models.split(",") if m.strip()], args.fresh)


if __name__ == "__main__":
    main()
