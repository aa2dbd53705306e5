"""How sensitive a causal LM's loss is to each linear's output, measured on public text.

For a linear ``y = W x`` the Kronecker-factored (K-FAC) picture of the loss around the trained
weights is: moving W by ΔW raises the loss by about ½·‖Gᵀ·ΔW·S‖²_F, where S·Sᵀ = E[x xᵀ] is the
second moment of the layer's inputs and G·Gᵀ = E[g gᵀ] that of the loss gradient g = ∂ℓ/∂y at
its output (the empirical Fisher). ``emulator.quant.collect_activations(gram=True)`` gives the
first; this module gives the second, so ``emulator.factorize`` can weigh a truncation by the
loss it costs — a number comparable across every matrix of the model, which lets one budget of
parameters be spread where it matters (the "gradient-preserving" idea of GradOT, training-free).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from emulator.arch import hf_model
from emulator.calibration import real_rows


def output_gradient_moments(
    model: nn.Module,
    linears: Mapping[str, nn.Module],
    batches: Sequence[Mapping[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """E[g gᵀ] (out × out, float64) of each of ``linears``' output gradients, g the gradient
    of the summed next-token loss of ``model`` (a causal LM) on ``batches``, averaged over the
    real (unpadded) tokens. The model's parameters are left as they were (no ``.grad``)."""
    sums: dict[str, torch.Tensor] = {}
    mask: list[torch.Tensor] = []

    def watch(name: str) -> Callable[[nn.Module, Any, torch.Tensor], None]:
        def record(_module: nn.Module, _args: Any, output: torch.Tensor) -> None:
            if not output.requires_grad:
                return

            def accumulate(grad: torch.Tensor) -> None:
                g = real_rows(grad.detach().float(), mask[0] if mask else None).cpu()
                gram = (g.T @ g).double()
                sums[name] = sums[name] + gram if name in sums else gram

            output.register_hook(accumulate)

        return record

    handles = [m.register_forward_hook(watch(n)) for n, m in linears.items()]
    try:
        tokens = loss_backward(model, batches, mask)
    finally:
        for handle in handles:
            handle.remove()
    return {name: total / tokens for name, total in sums.items()}


def loss_backward(
    model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]], mask: list[torch.Tensor]
) -> int:
    """Backpropagate ``model``'s summed next-token loss on each of ``batches`` into its
    activations only (hooks the caller registered read the gradients; ``mask`` holds the
    current batch's attention mask for them); the number of real tokens. The parameters are
    left as they were (no ``.grad``). ValueError when the batches hold no token."""

    def needs_grad(_module: nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor:
        return output.detach().requires_grad_(True)  # a graph without parameter gradients

    tokens = 0
    flags = {p: p.requires_grad for p in model.parameters()}
    embeddings = hf_model(model).get_input_embeddings()
    handle = embeddings.register_forward_hook(needs_grad)
    try:
        for param in flags:
            param.requires_grad_(False)
        device = next(model.parameters()).device
        for batch in batches:
            ids = batch["input_ids"].to(device)
            attention = batch.get("attention_mask")
            attention = torch.ones_like(ids) if attention is None else attention.to(device)
            mask[:] = [attention]
            with torch.enable_grad():
                logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
                targets = ids[:, 1:].masked_fill(attention[:, 1:] == 0, -100)
                loss = F.cross_entropy(
                    logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                    targets.reshape(-1),
                    ignore_index=-100,
                    reduction="sum",
                )
                loss.backward()
            tokens += int(attention.sum())
    finally:
        handle.remove()
        for param, flag in flags.items():
            param.requires_grad_(flag)
    if tokens == 0:
        raise ValueError("no calibration tokens: the loss's gradients are undefined")
    return tokens
