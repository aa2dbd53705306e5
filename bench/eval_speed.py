"""How fast is the five-way evaluation, and does each speed-up keep fp32's decisions?

Run: make bench-eval-speed   (= .venv/bin/python bench/eval_speed.py [--examples N] [--fresh])

On SmolLM2-135M (the full model, and the default 2-16-2 emulator), the same held-out bbc-news
examples scored by:

- **per-label**: the scorer before this benchmark: batches in data order, and with multi-token
  labels one prompt + label forward per label;
- **bucketed + shared** (`emulator.scoring.classify`, fp32): batches of similar length, one
  prompt forward whatever the number of labels, each label's further tokens on its KV cache;
- **bucketed + shared, bf16**: the same under bf16 autocast.

Each with bbc-news's own labels (one token each) and with multi-token names of the same five
topics (as user tasks have: "business and finance", ...). Reported: examples/s, the speed-up over
per-label in the same run, and the share of decisions that agree with fp32 per-label.
Timings alternate the methods (this machine is shared and noisy) and take the median of 3.
Cells are cached in bench/reports/eval_speed.json; the report is rewritten after every cell.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent
REPORTS = ROOT / "reports"
CACHE = REPORTS / "eval_speed.json"
REPEATS = 3
MULTI_TOKEN_NAMES = {
    "business": "business and finance",
    "entertainment": "entertainment and the arts",
    "politics": "politics and government",
    "sport": "sport and athletics",
    "tech": "technology and computing",
}


@torch.no_grad()
def per_label_decisions(
    model: Any, tokenizer: Any, examples: Sequence[Any], labels: Sequence[str], **common: Any
) -> list[int]:
    """The scorer as it was: data-order batches, a full prompt + label forward per label
    (or one forward when every label is one distinct token)."""
    from emulator.batches import collate, encode_pair, pad_id
    from emulator.forward import answer_logits, answer_token_logprobs, autocast
    from offsite.prompts import classification_parts, verbalize

    ids = [tokenizer(verbalize(label), add_special_tokens=False)["input_ids"] for label in labels]
    single = [i[0] for i in ids] if all(len(i) == 1 for i in ids) else None
    pad, picks = pad_id(tokenizer), []
    size, device, precision = common["batch_size"], common["device"], common["precision"]
    for start in range(0, len(examples), size):
        parts = [
            classification_parts(e.text, common["template"], common["max_words"])
            for e in examples[start : start + size]
        ]
        if single is not None:
            rows = [encode_pair(tokenizer, h, t, "", common["max_length"]) for h, t in parts]
            with autocast(precision, device):
                logits = answer_logits(model, collate(rows, pad).to(device), 1)[:, -1].float()
            scores = torch.log_softmax(logits, dim=-1)[:, single]
        else:
            columns = []
            for label in labels:
                rows = [
                    encode_pair(tokenizer, h, t, verbalize(label), common["max_length"])
                    for h, t in parts
                ]
                with autocast(precision, device):
                    logprobs, _ = answer_token_logprobs(model, collate(rows, pad).to(device))
                columns.append(logprobs.sum(-1))
            scores = torch.stack(columns, dim=-1)
        picks.extend(int(i) for i in scores.argmax(-1))
    return picks


def _timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run(count: int, fresh: bool) -> dict[str, Any]:
    from coordinator.models import load_full_model
    from emulator.build import build_configured_bundle
    from emulator.bundle import load_bundle_model
    from offsite.config import load_config
    from offsite.data import Example, load_task, split_holdout

    results: dict[str, Any] = {} if fresh or not CACHE.is_file() else json.loads(CACHE.read_text())
    config = load_config(None, [])
    full, tokenizer, arch, _ = load_full_model("smollm2-135m")
    task = load_task("bbc-news")
    _, held = split_holdout(task.examples, count, config.seed)
    common = dict(
        template=task.template,
        max_words=config.data.max_words,
        max_length=config.eval.max_length,
        batch_size=config.eval.batch_size,
        device=torch.device("cpu"),
    )
    with tempfile.TemporaryDirectory() as folder:
        plan, bundle = build_configured_bundle(full, tokenizer, arch, config, Path(folder))
        models = {"full model": full, f"emulator {plan.label}": load_bundle_model(bundle)}
        for label_kind in ("one-token labels", "multi-token labels"):
            rename = MULTI_TOKEN_NAMES if label_kind == "multi-token labels" else {}
            labels = [rename.get(label, label) for label in task.labels]
            examples = [Example(e.text, label=rename.get(e.label, e.label)) for e in held]
            for model_name, model in models.items():
                key = f"{model_name} | {label_kind}"
                if key not in results:
                    results[key] = _cell(model, tokenizer, examples, labels, common)
                    print(key, json.dumps(results[key]), flush=True)
                    _save(results)
    return results


def _cell(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Any],
    labels: Sequence[str],
    common: dict[str, Any],
) -> dict[str, Any]:
    from emulator.scoring import label_log_likelihoods

    methods = {
        "per-label": lambda: per_label_decisions(
            model, tokenizer, examples, labels, precision="fp32", **common
        ),
        "bucketed + shared": lambda: label_log_likelihoods(
            model, tokenizer, examples, labels, precision="fp32", **common
        ),
        "bucketed + shared, bf16": lambda: label_log_likelihoods(
            model, tokenizer, examples, labels, precision="bf16", **common
        ),
    }
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    outputs: dict[str, Any] = {}
    for _ in range(REPEATS):
        for method, fn in methods.items():
            elapsed, outputs[method] = _timed(fn)
            seconds[method].append(elapsed)
    reference = outputs["per-label"]
    median = {m: statistics.median(s) for m, s in seconds.items()}
    return {
        "examples": len(examples),
        "examples_per_s": {m: len(examples) / s for m, s in median.items()},
        "speedup": {m: median["per-label"] / s for m, s in median.items()},
        "agreement_with_fp32_per_label": {
            "per-label": 1.0,
            "bucketed + shared": _agreement(reference, outputs["bucketed + shared"]),
            "bucketed + shared, bf16": _agreement(reference, outputs["bucketed + shared, bf16"]),
        },
    }


def _agreement(reference: list[int], scores: torch.Tensor) -> float:
    """Share of examples whose highest-scoring label is the fp32 per-label scorer's pick."""
    picks = scores.argmax(-1).tolist()
    return sum(a == b for a, b in zip(picks, reference, strict=True)) / len(reference)


def _save(results: dict[str, Any]) -> None:
    REPORTS.mkdir(exist_ok=True)
    CACHE.write_text(json.dumps(results, indent=1))
    (REPORTS / "eval_speed.md").write_text(_markdown(results))


def _markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Evaluation speed (SmolLM2-135M, bbc-news held-out, fp32 unless noted)",
        "",
        "Written by `make bench-eval-speed` (bench/eval_speed.py); medians of 3 alternating "
        "timings on this 2-core machine. Agreement: share of examples whose picked label equals "
        "the fp32 per-label scorer's.",
        "",
        "| model | labels | method | examples/s | speed-up | agreement |",
        "|---|---|---|---:|---:|---:|",
    ]
    for key, cell in results.items():
        model, labels = key.split(" | ")
        for method, rate in cell["examples_per_s"].items():
            lines.append(
                f"| {model} | {labels} | {method} | {rate:.2f} | {cell['speedup'][method]:.2f}x"
                f" | {100 * cell['agreement_with_fp32_per_label'][method]:.1f} % |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=64, help="held-out examples per cell")
    parser.add_argument("--fresh", action="store_true", help="recompute cached cells")
    args = parser.parse_args()
    run(args.examples, args.fresh)


if __name__ == "__main__":
    main()
