"""What an emulator gives away, measured, and the owner's gate on it.

Two numbers a model owner can set a policy on:
- **verbatim middle tensors**: how many tensors of the full model's middle blocks (the part the
  adapter does not cover) ship bit-for-bit in the emulator. Plain layer drop ships every kept
  block verbatim; distillation or quantization changes the bytes.
- **perplexity ratio**: emulator perplexity ÷ full-model perplexity on held-out public text. A
  ratio near 1 means the emulator *is* (nearly) the full model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from emulator.arch import ArchSpec, block_list
from emulator.digest import tensor_sha256
from emulator.layers import LayerPlan
from emulator.split import unique_state
from emulator.tokenizers import Tokenizer
from offsite.errors import ExitCode, OffsiteError


class GateError(OffsiteError):
    """The emulator fails the owner's privacy gate; it must not be shipped."""

    exit_code = ExitCode.PRIVACY_GATE


def verbatim_middle(
    full_model: nn.Module, plan: LayerPlan, arch: ArchSpec, shipped_digests: set[str]
) -> tuple[int, int]:
    """(tensors of non-adapter blocks shipped bit-for-bit, tensors of non-adapter blocks)."""
    blocks = block_list(full_model, arch)
    adapter = set(plan.adapter_layers)
    total = verbatim = 0
    for index, block in enumerate(blocks):
        if index in adapter:
            continue
        for tensor in block.state_dict().values():
            total += 1
            verbatim += tensor_sha256(tensor) in shipped_digests
    return verbatim, total


def assess(
    full_model: nn.Module,
    emulator: nn.Module,
    plan: LayerPlan,
    arch: ArchSpec,
    shipped: Mapping[str, torch.Tensor],
    perplexity_fn: Callable[[nn.Module], float] | None = None,
) -> dict[str, Any]:
    """The privacy section of a bundle manifest.

    ``perplexity_fn(model) -> float`` scores held-out public text; without it the ratio is
    omitted (e.g. encoders, or no text at hand).
    """
    digests = {tensor_sha256(t) for t in shipped.values()}
    verbatim, total = verbatim_middle(full_model, plan, arch, digests)
    report: dict[str, Any] = {
        "middle_tensors": total,
        "middle_tensors_verbatim": verbatim,
        "middle_verbatim_fraction": verbatim / total if total else 0.0,
        "middle_blocks_dropped": len(plan.dropped_layers),
        "full_model_bytes": sum(
            t.numel() * t.element_size() for t in unique_state(full_model).values()
        ),
    }
    if perplexity_fn is not None:
        full_ppl, emulator_ppl = float(perplexity_fn(full_model)), float(perplexity_fn(emulator))
        report.update(
            full_perplexity=full_ppl,
            emulator_perplexity=emulator_ppl,
            perplexity_ratio=emulator_ppl / full_ppl,
        )
    return report


def enforce_gate(
    report: Mapping[str, Any], min_perplexity_ratio: float, max_verbatim_fraction: float
) -> None:
    """Refuse an emulator that is too close to the full model (raises ``GateError``)."""
    problems = []
    ratio = report.get("perplexity_ratio")
    if min_perplexity_ratio > 0:
        if ratio is None:
            problems.append("no perplexity ratio was measured (the gate needs public text)")
        elif ratio < min_perplexity_ratio:
            problems.append(
                f"emulator/full perplexity ratio {ratio:.2f} is below the gate "
                f"{min_perplexity_ratio:.2f}"
            )
    fraction = float(report["middle_verbatim_fraction"])
    if fraction > max_verbatim_fraction:
        problems.append(
            f"{report['middle_tensors_verbatim']} of {report['middle_tensors']} middle tensors "
            f"({100 * fraction:.0f} %) ship verbatim, above the gate "
            f"{100 * max_verbatim_fraction:.0f} %"
        )
    if problems:
        raise GateError(
            "emulator refused: "
            + "; ".join(problems)
            + ". Keep fewer middle blocks (emulator.keep), or relax emulator.min_perplexity_ratio "
            "/ emulator.max_verbatim_fraction if this is intended"
        )


def public_text_perplexity(
    tokenizer: Tokenizer, texts: Sequence[str], max_length: int = 128, batch_size: int = 8
) -> Callable[[nn.Module], float]:
    """A ``perplexity_fn`` over plain texts (fp32, CPU/GPU as available)."""
    from emulator.forward import pick_device
    from emulator.scoring import perplexity
    from offsite.data import Example

    examples = [Example("", completion=t) for t in texts]
    device = pick_device()

    def score(model: nn.Module) -> float:
        model.to(device)
        return perplexity(
            model,
            tokenizer,
            examples,
            max_words=max_length,
            max_length=max_length,
            batch_size=batch_size,
            precision="fp32",
            device=device,
        ).value

    return score
