"""Rotary position embedding of a query or key projection, fused with the layout change.

Under bf16 autocast a decoder block's ``q_proj(x).view(B, T, H, D).transpose(1, 2)`` is bf16
and the rotary tables are fp32 (they follow the fp32 residual stream), so ``q·cos +
rotate_half(q)·sin`` runs in fp32 by type promotion: a slice, a negation, a concatenation, two
products and a sum, then attention casts the result back to bf16 and copies the strided heads
into a contiguous batch for its matmuls. Backward runs as many ops again. Per SmolLM2 block
that is about twenty elementwise ops over the queries and keys.

``rotary_heads`` does it in one C pass each way (``client.kernels.native``): it reads the
projection in its [B, T, H · D] layout and writes [B, H, T, D] bf16, contiguous, computing the
same fp32 products and sum and the same bf16 rounding as those ops, and in backward the same
per-path roundings autograd makes: the same bits as the torch ops both ways (tested). Queries
of the last positions only (the lean decoder's last block) read the tables at those positions.
"""

from __future__ import annotations

from typing import Any

import torch

from client.kernels import native


def takes(projected: torch.Tensor, cos: torch.Tensor) -> bool:
    """Whether ``rotary_heads`` computes this: a contiguous bf16 projection on CPU under bf16
    autocast with fp32 [1 or B, T, D] tables, and the native loops built."""
    return (
        projected.device.type == "cpu"
        and projected.dtype == torch.bfloat16
        and projected.is_contiguous()
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and cos.dtype == torch.float32
        and cos.dim() == 3
        and cos.shape[0] in (1, projected.shape[0])
        and cos.shape[1] >= projected.shape[1]
        and native.library() is not None
    )


def _geometry(
    projected_shape: torch.Size, heads: int, cos: torch.Tensor
) -> tuple[int, int, int, int, int, int, int]:
    """(batch, length, heads, dim, table batch, table length, offset) for the C loops."""
    batch, length, width = projected_shape
    return (
        batch,
        length,
        heads,
        width // heads,
        cos.shape[0],
        cos.shape[1],
        cos.shape[1] - length,  # queries of the last positions read the last table rows
    )


class _RotaryHeads(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, projected: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int
    ) -> torch.Tensor:
        geometry = _geometry(projected.shape, heads, cos)
        batch, length, heads, dim = geometry[:4]
        out = torch.empty(batch, heads, length, dim, dtype=torch.bfloat16)
        native.loaded().offsite_rotary_heads(
            projected.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            *geometry,
            out.data_ptr(),
            torch.get_num_threads(),
        )
        ctx.save_for_backward(cos, sin)
        ctx.geometry, ctx.shape = geometry, projected.shape
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        cos, sin = ctx.saved_tensors
        grad = grad.to(torch.bfloat16).contiguous()
        dx = torch.empty(ctx.shape, dtype=torch.bfloat16)
        native.loaded().offsite_rotary_heads_backward(
            grad.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            *ctx.geometry,
            dx.data_ptr(),
            torch.get_num_threads(),
        )
        return dx, None, None, None


def rotary_heads(
    projected: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int
) -> torch.Tensor:
    """[B, T, heads · D] projection → [B, heads, T, D] bf16, rotated by the positions' tables
    ([1 or B, ≥ T, D] fp32; the last T rows are used), for inputs ``takes`` accepts."""
    out: torch.Tensor = _RotaryHeads.apply(projected, cos.contiguous(), sin.contiguous(), heads)  # type: ignore[no-untyped-call]  # torch: apply is unannotated
    return out
