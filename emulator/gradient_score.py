"""How well an emulator preserves the adapter's gradients: a training-free score of a candidate.

Offsite-tuning transfers when the adapter, trained against the emulator, moves the way it would
have moved against the full model. So a candidate emulator is scored by what the adapter sees
(the GradOT idea, learned from its paper, not copied): on public calibration text, the gradient
of the language-modelling loss with respect to every adapter-block parameter is computed through
the full model and through the emulator, with the adapter blocks' weights identical, and compared
per adapter block —

- ``relative_error`` = ‖g_emulator − g_full‖ / ‖g_full‖ (0 when the emulator is the full model),
- ``cosine`` between the two flattened gradients,

and the emulator's own loss rise (``loss_emulator − loss_full``, the privacy side: a useful but
not too useful emulator). ``gradient_error`` = mean over adapter blocks of 1 − cosine — the
direction the adapter is pushed, not how hard — is the number candidates are ranked by (lower is
better). Measured on SmolLM2's eight undistilled emulator cells (bench/reports/gradient_score.md,
single-seed plug-in): Spearman ρ of the mean cosine with plug-in +0.66, of the relative error
+0.16 (wrong sign: emulators push the adapter 5–13× harder than the full model does, and that
magnitude swamps the relative error), of the loss rise −0.69.

Gradients are summed over the calibration batches first, as the adapter's training would see
them over a few steps; the full model's gradients are computed once per (model, texts) and
reused for every candidate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from emulator.arch import ArchSpec, block_list
from emulator.batches import Batch
from emulator.forward import answer_loss
from emulator.layers import LayerPlan


@dataclass(frozen=True)
class GradientScore:
    gradient_error: float  # mean over adapter blocks of 1 − cosine (lower is better)
    per_block: dict[int, dict[str, float]]  # full-model block index -> relative_error, cosine
    loss_full: float
    loss_emulator: float

    @property
    def loss_rise(self) -> float:
        return self.loss_emulator - self.loss_full

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["loss_rise"] = self.loss_rise
        return out


def adapter_gradients(
    model: nn.Module,
    arch: ArchSpec,
    block_indices: Mapping[int, int],
    batches: Sequence[Batch],
) -> tuple[dict[int, torch.Tensor], float]:
    """Summed LM-loss gradients of the blocks ``block_indices`` (model block index -> full-model
    index), flattened per block, and the mean loss. Only those blocks' parameters get
    gradients; everything else is frozen for the pass and restored afterwards."""
    blocks = block_list(model, arch)
    wanted = {full: list(blocks[own].parameters()) for own, full in block_indices.items()}
    trainable = {id(p) for params in wanted.values() for p in params}
    previous = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
        p.grad = None
    was_training = model.training
    model.eval()  # no dropout: the comparison is between deterministic functions
    total = 0.0
    try:
        for batch in batches:
            loss = answer_loss(model, batch)
            loss.backward()
            total += float(loss.detach())
        grads = {
            full: torch.cat(
                [
                    (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                    for p in params
                ]
            )
            for full, params in wanted.items()
        }
    finally:
        for p in model.parameters():
            p.grad = None
            p.requires_grad_(previous[id(p)])
        model.train(was_training)
    return grads, total / max(len(batches), 1)


def score_emulator(
    full_model: nn.Module,
    emulator: nn.Module,
    plan: LayerPlan,
    arch: ArchSpec,
    batches: Sequence[Batch],
    full_reference: tuple[dict[int, torch.Tensor], float] | None = None,
) -> GradientScore:
    """Score ``emulator`` (blocks in ``plan.emulator_layers`` order) against ``full_model``.

    ``full_reference`` is the full model's ``adapter_gradients`` for the same batches (compute it
    once with ``full_reference_gradients`` when scoring many candidates)."""
    reference = full_reference or full_reference_gradients(full_model, plan, arch, batches)
    full_grads, loss_full = reference
    own = {emu: full for emu, full in plan.emulator_to_full().items() if full in full_grads}
    emu_grads, loss_emulator = adapter_gradients(emulator, arch, own, batches)
    per_block = {}
    for full, g_full in full_grads.items():
        g_emu = emu_grads[full]
        norm = float(g_full.norm())
        error = float((g_emu - g_full).norm()) / norm if norm > 0 else float(g_emu.norm() > 0)
        cosine = float(nn.functional.cosine_similarity(g_emu, g_full, dim=0)) if norm > 0 else 1.0
        per_block[full] = {"relative_error": error, "cosine": cosine}
    direction = sum(1.0 - b["cosine"] for b in per_block.values()) / len(per_block)
    return GradientScore(max(direction, 0.0), per_block, loss_full, loss_emulator)


def full_reference_gradients(
    full_model: nn.Module, plan: LayerPlan, arch: ArchSpec, batches: Sequence[Batch]
) -> tuple[dict[int, torch.Tensor], float]:
    """The full model's adapter-block gradients and loss: the reference every candidate meets."""
    return adapter_gradients(full_model, arch, {i: i for i in plan.adapter_layers}, batches)
