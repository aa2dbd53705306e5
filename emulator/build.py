"""Build a bundle the owner is willing to ship: split, measure what it gives away, gate, write."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from emulator.adapter import AdapterSpec
from emulator.arch import ArchSpec
from emulator.bundle import Bundle, write_bundle
from emulator.distill import distill
from emulator.forward import pick_device, resolve_precision
from emulator.layers import LayerPlan, plan_layers
from emulator.privacy import assess, enforce_gate, public_text_perplexity
from emulator.selection import block_change_scores, select_by_change
from emulator.split import build_emulator, emulator_state, unique_state
from offsite.config import EmulatorConfig
from offsite.data import load_task

log = logging.getLogger(__name__)


def public_texts(name: str, count: int) -> list[str]:
    """The first ``count`` texts of a public corpus (never the task data)."""
    task = load_task(name)
    texts = [(e.text + (e.completion or "")).strip() for e in task.examples]
    return [t for t in texts if t][:count]


def choose_plan(
    full_model: nn.Module, tokenizer: Any, arch: ArchSpec, settings: EmulatorConfig
) -> LayerPlan:
    """The layer plan for ``settings.selection`` (uniform, or cosine on public text)."""
    plan = plan_layers(
        int(full_model.config.num_hidden_layers), settings.bottom, settings.top, settings.keep
    )
    if settings.selection == "uniform" or settings.keep == -1:
        return plan
    texts = public_texts(settings.public_text, settings.public_examples)
    scores = block_change_scores(full_model, tokenizer, texts)
    chosen = select_by_change(plan, scores, len(plan.middle_kept))
    log.info("  cosine selection kept middle blocks %s", list(chosen.middle_kept))
    return chosen


def build_bundle(
    full_model: nn.Module,
    tokenizer: Any,
    arch: ArchSpec,
    plan: LayerPlan,
    adapter: AdapterSpec,
    out_dir: Path,
    *,
    source: str,
    settings: EmulatorConfig,
) -> Bundle:
    """Split ``full_model`` by ``plan``, assess the emulator, enforce the gate, write the bundle."""
    emulator = build_emulator(full_model, plan, arch)
    perplexity_fn = None
    compression: dict[str, Any] = {
        "method": "layer-drop",
        "selection": settings.selection,
        "kept_middle": len(plan.middle_kept),
    }
    if settings.public_text and arch.causal_lm:
        extra = settings.distill_texts + settings.public_examples if settings.distill else 0
        texts = public_texts(settings.public_text, settings.public_examples + extra)
        report_texts = texts[: settings.public_examples]
        perplexity_fn = public_text_perplexity(tokenizer, report_texts)
        if settings.distill:
            held = texts[settings.public_examples : 2 * settings.public_examples]
            train = texts[2 * settings.public_examples :]
            device = pick_device()
            result = distill(
                full_model,
                emulator,
                plan,
                arch,
                tokenizer,
                train,
                held,
                steps=settings.distill_steps,
                lr=settings.distill_lr,
                batch_size=settings.distill_batch_size,
                max_length=settings.distill_max_length,
                precision=resolve_precision("auto", device),
                device=device,
                checkpoint=out_dir.with_name(out_dir.name + ".distill-checkpoint"),
            )
            compression["distilled"] = {
                "corpus": settings.public_text,
                "texts": len(train),
                "lr": settings.distill_lr,
                **result.to_dict(),
            }
            full_model.to("cpu")
            emulator.to("cpu")
    shipped = unique_state(emulator) if settings.distill else emulator_state(full_model, plan, arch)
    report = assess(full_model, emulator, plan, arch, shipped, perplexity_fn)
    enforce_gate(report, settings.min_perplexity_ratio, settings.max_verbatim_fraction)
    bundle = write_bundle(
        full_model,
        tokenizer,
        plan,
        adapter,
        out_dir,
        source=source,
        privacy=report,
        compression=compression,
        state=shipped,
    )
    log.info("  %s", describe_privacy(report))
    return bundle


def describe_privacy(report: dict[str, Any]) -> str:
    text = (
        f"middle tensors shipped verbatim: {report['middle_tensors_verbatim']} of "
        f"{report['middle_tensors']} ({100 * report['middle_verbatim_fraction']:.0f} %)"
    )
    if "perplexity_ratio" in report:
        text += (
            f"; public-text perplexity emulator {report['emulator_perplexity']:.1f} vs full "
            f"{report['full_perplexity']:.1f} (ratio {report['perplexity_ratio']:.2f})"
        )
    return text
