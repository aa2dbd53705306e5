"""RMS norm that keeps its normalized output for backward, in the compute dtype.

Eager ``x * rsqrt(mean(x²) + eps)`` keeps the fp32 residual ``x`` for backward (the power's and
the product's gradients both read it): on SmolLM2-135M's 2-6-2 emulator under bf16 autocast
that is 20 tensors of 8 × 128 × 576 fp32, 45 MB of the step's 175 MB of saved activations. The
gradient needs only the normalized ``x̂ = x · rstd`` and ``rstd`` (one number per row):

    g = dy · w,   dx = rstd · (g − x̂ · mean(g · x̂)),   dw = Σ_rows dy · x̂

so this function keeps ``x̂`` in the autocast dtype when autocast is on (bf16: half the bytes,
22.5 MB less on that emulator) and in the input's dtype otherwise (fp32 compute keeps fp32, the
same numbers as eager up to summation order). Forward values are the same bits as eager's.
The bf16 copy rounds what backward reads by at most 2⁻⁹ relative, the precision every bf16
linear's input gradient already has (tested against eager fp32 autograd).

Under bf16 autocast on CPU (an fp32 residual stream, the client's case), forward and the input
gradient are one C pass per row each (``client.kernels.native``) instead of torch's six to
eight elementwise ops, each a pass over the 8 × 128 × 576 activations (the client's
throughput with them: bench/reports/client.md). Their row
sums run in another order than torch's, so rstd, and the output, may differ from eager's in
the last bits (within 4 ulps, tested); the weight's gradient, where one is needed, stays in
torch ops. Without a C compiler, torch ops: eager's forward bits.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from client.kernels import native
from emulator.arch import REGISTRY
from emulator.surgery import replace_module

# Norms that compute exactly ``weight * (x.float() * rsqrt(mean(x²) + eps)).to(x.dtype)``, by
# (module, class) so no family's modeling code is imported to recognise its norm: each family's
# ``ArchSpec.rms_norm`` and the lean decoder's own. Gemma's ``1 + weight`` norm is not one.
LLAMA_STYLE_NORMS = frozenset(
    {
        ("client.runtime.decoder", "RMSNorm"),
        *(
            (module, name)
            for module, _, name in (
                spec.rms_norm.rpartition(".") for spec in REGISTRY.values() if spec.rms_norm
            )
        ),
    }
)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float, keep: torch.dtype
    ) -> torch.Tensor:
        dtype = x.dtype
        ctx.dtype, ctx.native = dtype, _native_takes(x, weight, keep)
        if ctx.native:
            out, normed, rstd = _native_forward(x, weight, eps)
            ctx.save_for_backward(normed, rstd, weight)
            return out
        xf = x.to(torch.float32)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        normed = xf * rstd
        ctx.save_for_backward(normed.to(keep), rstd, weight)
        return weight * normed.to(dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        normed, rstd, weight = ctx.saved_tensors
        grad_weight = None
        if ctx.needs_input_grad[1]:
            rows = grad * normed.to(ctx.dtype)
            grad_weight = rows.reshape(-1, rows.shape[-1]).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0] and ctx.native:
            grad_x = _native_backward(grad, normed, rstd, weight)
        elif ctx.needs_input_grad[0]:
            scaled = (grad * weight).to(torch.float32)
            xhat = normed.to(torch.float32)
            inner = (scaled * xhat).mean(-1, keepdim=True)
            grad_x = (scaled - xhat * inner).mul_(rstd).to(ctx.dtype)
        return grad_x, grad_weight, None, None


def _native_takes(x: torch.Tensor, weight: torch.Tensor, keep: torch.dtype) -> bool:
    """Whether ``client.kernels.native``'s loops compute this norm: a contiguous fp32 residual
    stream on CPU normed for bf16 compute (bf16 autocast), an fp32 weight, loops built."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.is_contiguous()
        and keep == torch.bfloat16
        and weight.dtype == torch.float32
        and weight.shape == x.shape[-1:]
        and weight.is_contiguous()
        and native.library() is not None
    )


def _native_forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output, x̂ in bf16, rstd [..., 1]) in one pass per row."""
    cols = x.shape[-1]
    rows = x.numel() // cols
    out = torch.empty_like(x)
    normed = torch.empty(x.shape, dtype=torch.bfloat16)
    rstd = torch.empty(*x.shape[:-1], 1, dtype=torch.float32)
    native.loaded().offsite_rms_norm(
        x.data_ptr(),
        weight.data_ptr(),
        rows,
        cols,
        eps,
        out.data_ptr(),
        normed.data_ptr(),
        rstd.data_ptr(),
        torch.get_num_threads(),
    )
    return out, normed, rstd


def _native_backward(
    grad: torch.Tensor, normed: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """The input gradient (fp32) in one pass per row."""
    grad = grad.to(torch.float32).contiguous()
    cols = grad.shape[-1]
    dx = torch.empty_like(grad)
    native.loaded().offsite_rms_norm_backward(
        grad.data_ptr(),
        normed.data_ptr(),
        rstd.data_ptr(),
        weight.data_ptr(),
        grad.numel() // cols,
        cols,
        dx.data_ptr(),
        torch.get_num_threads(),
    )
    return dx


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight · (x / rms(x))`` computed in fp32, returned in ``x``'s dtype (Llama's RMSNorm)."""
    device = x.device.type
    keep = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    out: torch.Tensor = _RMSNorm.apply(x, weight, eps, keep)  # type: ignore[no-untyped-call]  # torch: apply is unannotated
    return out


class LeanRMSNorm(nn.Module):
    """A Llama-style RMS norm (same ``weight`` parameter and state-dict key) on ``rms_norm``."""

    def __init__(self, weight: nn.Parameter, eps: float) -> None:
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.variance_epsilon)


def lean_rms_norms(model: nn.Module) -> int:
    """Swap every Llama-style RMS norm in ``model`` (``LLAMA_STYLE_NORMS``) for a
    ``LeanRMSNorm`` sharing its weight; returns how many were swapped."""
    found = [
        (name, module)
        for name, module in model.named_modules()
        if (type(module).__module__, type(module).__name__) in LLAMA_STYLE_NORMS
    ]
    for name, module in found:  # each of them keeps its epsilon as ``variance_epsilon``
        eps = float(module.variance_epsilon)
        replace_module(model, name, LeanRMSNorm(module.weight, eps))
    return len(found)
