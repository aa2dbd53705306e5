"""Build a bundle the owner is willing to ship: split, measure what it gives away, gate, write."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from emulator.adapter import AdapterSpec
from emulator.arch import ArchSpec
from emulator.bundle import Bundle, write_bundle
from emulator.layers import LayerPlan
from emulator.privacy import assess, enforce_gate, public_text_perplexity
from emulator.split import build_emulator, emulator_state
from offsite.config import EmulatorConfig
from offsite.data import load_task

log = logging.getLogger(__name__)


def public_texts(name: str, count: int) -> list[str]:
    """The first ``count`` texts of a public corpus (never the task data)."""
    task = load_task(name)
    texts = [(e.text + (e.completion or "")).strip() for e in task.examples]
    return [t for t in texts if t][:count]


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
    if settings.public_text and arch.causal_lm:
        texts = public_texts(settings.public_text, settings.public_examples)
        perplexity_fn = public_text_perplexity(tokenizer, texts)
    report = assess(
        full_model, emulator, plan, arch, emulator_state(full_model, plan, arch), perplexity_fn
    )
    del emulator
    enforce_gate(report, settings.min_perplexity_ratio, settings.max_verbatim_fraction)
    bundle = write_bundle(
        full_model, tokenizer, plan, adapter, out_dir, source=source, privacy=report
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
