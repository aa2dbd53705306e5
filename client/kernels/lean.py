"""Memory-lean autograd for gated MLPs: one activation fewer kept per block, same numbers.

Backward through the frozen emulator (the LoRA policy's gradient must reach the bottom adapter
blocks) keeps, per block, what autograd's generic ops save. Measured on SmolLM2-135M's blocks
(8 × 128 tokens, bf16 compute): 16.3 MB of activations per frozen block, 9.4 MB of them in the
gated MLP ``down(act(gate(x)) * up(x))``: ``gate(x)`` for the activation's backward, and both
``act(gate(x))`` and ``up(x)`` for the product's. ``act(gate(x))`` is an elementwise function
of a tensor already kept, so ``GatedProduct`` keeps ``gate(x)`` and ``up(x)`` only and
recomputes the activation in backward: a third of the MLP's saved bytes (3.1 MB per block)
for one elementwise op, with the same gradient (tested bitwise against eager autograd).

The frozen linears around it keep nothing themselves (no weight gradient needs their input),
so this is the last large tensor a frozen MLP saves that costs no matmul to avoid. The swap
holds for MLPs with LoRA or trainable projections too: each projection keeps what its own weight
gradient needs, and only the product's third tensor goes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from client.kernels import int8_mlp
from emulator.arch import GATED_MLP_PROJECTIONS, ArchSpec
from emulator.layers import block_part
from emulator.surgery import replace_module

Derivative = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (grad, x) -> grad of act(x)


def derivative(act: object) -> Derivative | None:
    """The backward kernel of an activation module that computes a known torch function, called
    directly (``torch.autograd.grad`` would give the same numbers but imports torch's
    symbolic-shape machinery, sympy ~30 MB, on first use); None for anything else.

    Known: torch's ``SiLU`` and ``GELU`` (either approximation) and transformers' modules that
    call ``F.silu`` or ``F.gelu`` (``SiLUActivation``, ``GELUActivation``, ``GELUTanh``: Gemma's
    ``gelu_pytorch_tanh``); their own pure-Python variants are left to autograd.
    """
    if isinstance(act, nn.SiLU) or type(act).__name__ in int8_mlp.SILU_TYPES:
        return lambda grad, x: torch.ops.aten.silu_backward(grad, x)
    if isinstance(act, nn.GELU):
        return _gelu_backward(act.approximate)
    inner = getattr(act, "act", None)  # transformers' GELU modules keep the function they call
    if inner is F.gelu:
        return _gelu_backward("none")
    if isinstance(inner, functools.partial) and inner.func is F.gelu and not inner.args:
        return _gelu_backward(str(inner.keywords.get("approximate", "none")))
    return None


def _gelu_backward(approximate: str) -> Derivative:
    return lambda grad, x: torch.ops.aten.gelu_backward(grad, x, approximate=approximate)


def _no_hooks(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


class GatedProduct(torch.autograd.Function):
    """``act(gate) * up`` keeping ``gate`` and ``up`` for backward, not ``act(gate)``."""

    @staticmethod
    def forward(
        ctx: Any, gate: torch.Tensor, up: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        ctx.act = act
        ctx.save_for_backward(gate, up)
        return act(gate) * up

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        gate, up = ctx.saved_tensors
        kernel = derivative(ctx.act)
        if kernel is not None:  # the kernel autograd itself would run
            grad_up = grad * ctx.act(gate) if ctx.needs_input_grad[1] else None
            grad_gate = kernel(grad * up, gate) if ctx.needs_input_grad[0] else None
            return grad_gate, grad_up, None
        # Any other activation: recompute it under autograd. Its saved tensors must not reach an
        # outer saved-tensor hook (the activation buffer would copy ``gate``, which already lives
        # in it): this small graph is used and dropped right here.
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_no_hooks, _no_hooks):
            leaf = gate.detach().requires_grad_(ctx.needs_input_grad[0])
            activated = ctx.act(leaf)
        grad_up = grad * activated.detach() if ctx.needs_input_grad[1] else None
        grad_gate = None
        if ctx.needs_input_grad[0]:
            (grad_gate,) = torch.autograd.grad(activated, leaf, grad * up)
        return grad_gate, grad_up, None


class LeanGatedMLP(nn.Module):
    """A gated MLP (same sub-modules and state-dict keys) computed with ``GatedProduct``;
    ``projections`` are its (gate, up, down) names (``ArchSpec.gated_mlp_projections``)."""

    def __init__(
        self, mlp: nn.Module, projections: tuple[str, str, str] = GATED_MLP_PROJECTIONS
    ) -> None:
        super().__init__()
        self.projections = projections
        for name in projections:
            self.add_module(name, getattr(mlp, name))
        self.act_fn = mlp.act_fn

    def _projection(self, index: int) -> nn.Module:
        module = self._modules[self.projections[index]]
        assert module is not None  # __init__ added all three
        return module

    @property
    def gate(self) -> nn.Module:
        return self._projection(0)

    @property
    def up(self) -> nn.Module:
        return self._projection(1)

    @property
    def down(self) -> nn.Module:
        return self._projection(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if int8_mlp.takes(self, x):
            return int8_mlp.int8_gated_mlp(x, self)
        product = GatedProduct.apply(self.gate(x), self.up(x), self.act_fn)  # type: ignore[no-untyped-call]  # torch: apply is unannotated
        out: torch.Tensor = self.down(product)
        return out


def lean_gated_mlps(model: nn.Module, arch: ArchSpec, prefix: str) -> int:
    """Swap every gated MLP of the blocks under ``prefix`` (the state-dict prefix of the block
    list in ``model``) for a ``LeanGatedMLP``; returns how many were swapped. Frozen or not:
    the projections (LoRA-wrapped or trainable) keep what their weight gradients need
    themselves."""
    if not arch.gated_mlp:
        return 0
    found = [
        name
        for name, module in model.named_modules()
        if block_part(name, prefix) == arch.gated_mlp and not isinstance(module, LeanGatedMLP)
    ]
    for name in found:
        mlp = LeanGatedMLP(model.get_submodule(name), arch.gated_mlp_projections)
        replace_module(model, name, mlp)
    return len(found)
