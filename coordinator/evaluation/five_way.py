"""The five-way evaluation that makes the offsite-tuning claim measurable.

| setting             | model                                                         |
|---------------------|---------------------------------------------------------------|
| full zero-shot      | the full model, untouched                                     |
| emulator zero-shot  | adapter + emulator, untouched                                 |
| emulator fine-tuned | the trained adapter on the emulator (what a data owner sees)  |
| plug-in             | the trained adapter plugged into the full model (the product) |
| full fine-tuned     | optional: the same adapter recipe trained on the full model   |

All settings score the same held-out examples with the same prompts and precision.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import torch
from torch import nn

from emulator.adapter import AdapterSpec, attach_adapter
from emulator.bundle import Bundle, bundle_arch, load_bundle_model
from emulator.forward import resolve_precision
from emulator.plug import plug_adapter
from emulator.scoring import Score, classify, perplexity
from emulator.tokenizers import Tokenizer
from offsite.config import OffsiteConfig
from offsite.data import Example, Task

SETTINGS = (
    ("full_zero_shot", "full zero-shot"),
    ("emulator_zero_shot", "emulator zero-shot"),
    ("emulator_fine_tuned", "emulator fine-tuned"),
    ("plug_in", "plug-in"),
    ("full_fine_tuned", "full fine-tuned"),
)


@dataclass(frozen=True)
class EvalSpec:
    task: Task
    examples: Sequence[Example]
    template: str
    max_words: int
    max_length: int
    batch_size: int
    precision: str
    device: torch.device

    @classmethod
    def from_config(
        cls, config: OffsiteConfig, task: Task, examples: Sequence[Example], device: torch.device
    ) -> EvalSpec:
        return cls(
            task,
            examples,
            config.data.template or task.template,
            config.data.max_words,
            config.eval.max_length,
            config.eval.batch_size,
            config.eval.precision,
            device,
        )


class _ScoringArgs(TypedDict):
    """The keyword arguments ``classify`` and ``perplexity`` share."""

    max_words: int
    max_length: int
    batch_size: int
    precision: str
    device: torch.device
    progress: Callable[[int], None] | None


def score_model(
    model: nn.Module,
    tokenizer: Tokenizer,
    spec: EvalSpec,
    progress: Callable[[int], None] | None = None,
) -> Score:
    precision = resolve_precision(spec.precision, spec.device)
    common = _ScoringArgs(
        max_words=spec.max_words,
        max_length=spec.max_length,
        batch_size=spec.batch_size,
        precision=precision,
        device=spec.device,
        progress=progress,
    )
    if spec.task.kind == "classification":
        return classify(
            model, tokenizer, spec.examples, spec.task.labels, template=spec.template, **common
        )
    return perplexity(model, tokenizer, spec.examples, **common)


def evaluate_emulator(
    bundle: Bundle,
    tokenizer: Tokenizer,
    adapter_state: Mapping[str, torch.Tensor] | None,
    spec: EvalSpec,
    progress: Callable[[int], None] | None = None,
) -> Score:
    """Score the emulator, untouched (``adapter_state=None``) or with a trained adapter."""
    model = load_bundle_model(bundle).to(spec.device)
    if adapter_state is not None:
        adapted = attach_adapter(
            model, bundle_arch(bundle), bundle.adapter, bundle.plan.emulator_to_full()
        )
        adapted.load_trainable(adapter_state)
        model = adapted.model
    return score_model(model, tokenizer, spec, progress)


def evaluate_plug_in(
    full_model: nn.Module,
    tokenizer: Tokenizer,
    adapter: AdapterSpec,
    adapter_state: Mapping[str, torch.Tensor],
    spec: EvalSpec,
    progress: Callable[[int], None] | None = None,
) -> Score:
    plugged = plug_adapter(copy.deepcopy(full_model), adapter, adapter_state)
    return score_model(plugged.model, tokenizer, spec, progress)


def four_way(
    full_model: nn.Module,
    tokenizer: Tokenizer,
    bundle: Bundle,
    adapter_state: Mapping[str, torch.Tensor],
    spec: EvalSpec,
    bar: Any,
    full_zero_shot: Score | None = None,
) -> dict[str, Score]:
    """The four settings every run reports; ``bar`` is a tqdm bar advanced per example.
    ``full_zero_shot``, when given (a cached score), is not recomputed."""
    scores: dict[str, Score] = {}
    full_model.to(spec.device)
    bar.set_postfix_str("full zero-shot")
    if full_zero_shot is None:
        full_zero_shot = score_model(full_model, tokenizer, spec, bar.update)
    else:
        bar.update(len(spec.examples))
    scores["full_zero_shot"] = full_zero_shot
    bar.set_postfix_str("emulator zero-shot")
    scores["emulator_zero_shot"] = evaluate_emulator(bundle, tokenizer, None, spec, bar.update)
    bar.set_postfix_str("emulator fine-tuned")
    scores["emulator_fine_tuned"] = evaluate_emulator(
        bundle, tokenizer, adapter_state, spec, bar.update
    )
    bar.set_postfix_str("plug-in")
    scores["plug_in"] = evaluate_plug_in(
        full_model, tokenizer, bundle.adapter, adapter_state, spec, bar.update
    )
    return scores
