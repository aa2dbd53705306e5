"""Matmul backends for packed frozen weights, chosen by device type (data, not branches).

A backend computes ``y = (x / s_in) · Wᵀ`` (forward) and ``dx = (dy · W) / s_in`` (the input
gradient) from a ``PackedWeight`` (``s_in``: its activation-aware input scale, if any) without
materialising more than one block of dequantized rows at a time.

- ``cpu``: where torch's fused int8 kernel is fast (few rows, e.g. generation) it is used for the
  forward. Per-channel int8 weights in bf16 compute on a CPU with int8 dot products multiply
  int8 × int8 (``client.kernels.int8_matmul``: activations and gradients quantized per row,
  faster than the bf16 matmul at training's row counts). Otherwise rows of W are dequantized
  block by block into the compute dtype and fed to the dense matmul, which on a bf16-capable
  CPU is the fastest floating-point kernel torch has (``_weight_int8pack_mm`` is slower than
  dequantize + bf16 matmul at training's row counts, much faster at a few rows). The client's
  throughput on these backends: bench/reports/client.md.
- ``cuda``: the same blocked dequantize-matmul with larger blocks (GPU memory is the budget,
  cuBLAS the kernel). It runs on any device, which is how the CPU tests keep it equivalent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch

from client.kernels.int8_matmul import cpu_has_int8_dot, int8_forward, int8_input_grad
from client.kernels.packed import PackedWeight, dequantize_rows

FUSED_INT8_MAX_ROWS = 16  # at or below this many input rows the fused int8 kernel wins on CPU


@dataclass(frozen=True)
class KernelBackend:
    name: str
    block_elements: int  # dequantized elements per block of rows
    forward: Callable[[torch.Tensor, PackedWeight, int], torch.Tensor]
    backward: Callable[[torch.Tensor, PackedWeight, int], torch.Tensor]


def _row_blocks(weight: PackedWeight, block_elements: int) -> list[tuple[int, int]]:
    rows = max(1, block_elements // weight.in_features)
    return [
        (start, min(start + rows, weight.out_features))
        for start in range(0, weight.out_features, rows)
    ]


def blocked_forward(x: torch.Tensor, weight: PackedWeight, block_elements: int) -> torch.Tensor:
    """``x [M, in] · Wᵀ (+ bias)`` by blocks of dequantized rows; x is in the compute dtype."""
    blocks = _row_blocks(weight, block_elements)
    bias = weight.bias
    if len(blocks) == 1:
        dense = dequantize_rows(weight, 0, weight.out_features)
        if bias is None:
            return x @ dense.t()
        return torch.addmm(bias, x, dense.t())
    parts = []
    for start, stop in blocks:
        dense = dequantize_rows(weight, start, stop)
        part = x @ dense.t()
        if bias is not None:
            part += bias[start:stop]
        parts.append(part)
        del dense
    return torch.cat(parts, dim=1)


def blocked_backward(dy: torch.Tensor, weight: PackedWeight, block_elements: int) -> torch.Tensor:
    """``dy [M, out] · W`` accumulated over blocks of dequantized rows."""
    dx: torch.Tensor | None = None
    for start, stop in _row_blocks(weight, block_elements):
        dense = dequantize_rows(weight, start, stop)
        piece = dy[:, start:stop]
        dx = piece @ dense if dx is None else dx.addmm_(piece, dense)
        del dense
    assert dx is not None
    return dx


def integer_matmuls(weight: PackedWeight) -> bool:
    """Whether ``client.kernels.int8_matmul`` computes this layer on CPU: per-channel int8
    codes, bf16 compute (fp32 compute asks for full-precision activations) and a CPU with int8
    dot products."""
    return (
        weight.bits == 8
        and weight.groups == 1
        and weight.dtype == torch.bfloat16
        and cpu_has_int8_dot()
    )


def int8_factors(weight: PackedWeight) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The integer matmuls' fp32 factors of a per-channel int8 weight: its scales [out] and
    its input scale's inverse [in] (None without one), as packed or derived here."""
    scales = weight.fp32_scales
    if scales is None:
        scales = weight.scales[:, 0].float()
    inverse = weight.fp32_inverse_input
    if inverse is None and weight.input_scale is not None:
        inverse = weight.input_scale.float().reciprocal()
    return scales, inverse


def _over_input_scale(t: torch.Tensor, weight: PackedWeight) -> torch.Tensor:
    """``t`` divided by the layer's activation-aware input scale (the input going forward, its
    gradient coming back), or ``t`` itself when the layer has none."""
    return t if weight.input_scale is None else t / weight.input_scale


def scaled_forward(x: torch.Tensor, weight: PackedWeight, block_elements: int) -> torch.Tensor:
    """``blocked_forward`` of ``x`` divided by the layer's activation-aware input scale."""
    return blocked_forward(_over_input_scale(x, weight), weight, block_elements)


def scaled_backward(dy: torch.Tensor, weight: PackedWeight, block_elements: int) -> torch.Tensor:
    """``blocked_backward``, divided by the layer's activation-aware input scale."""
    return _over_input_scale(blocked_backward(dy, weight, block_elements), weight)


def cpu_forward(x: torch.Tensor, weight: PackedWeight, block_elements: int) -> torch.Tensor:
    if integer_matmuls(weight) and x.shape[0] > FUSED_INT8_MAX_ROWS:
        # the input scale rides in the quantizing pass instead of a division of its own
        scales, inverse = int8_factors(weight)
        out = int8_forward(x, weight.codes, scales, inverse)
        return out if weight.bias is None else out.add_(weight.bias)
    if weight.bits == 8 and weight.groups == 1 and x.shape[0] <= FUSED_INT8_MAX_ROWS:
        x = _over_input_scale(x, weight)
        out = cast(  # torch.ops is untyped
            torch.Tensor, torch.ops.aten._weight_int8pack_mm(x, weight.codes, weight.scales[:, 0])
        )
        return out if weight.bias is None else out + weight.bias
    return scaled_forward(x, weight, block_elements)


def cpu_backward(dy: torch.Tensor, weight: PackedWeight, block_elements: int) -> torch.Tensor:
    if integer_matmuls(weight) and dy.shape[0] > FUSED_INT8_MAX_ROWS:
        scales, inverse = int8_factors(weight)
        return int8_input_grad(dy, weight.codes, scales, inverse)
    return scaled_backward(dy, weight, block_elements)


BACKENDS: dict[str, KernelBackend] = {
    "cpu": KernelBackend("cpu", 1 << 22, cpu_forward, cpu_backward),
    "cuda": KernelBackend("cuda", 1 << 26, scaled_forward, scaled_backward),
}


def backend_for(device: torch.device) -> KernelBackend:
    """The backend for ``device``: CUDA when the weights live on a GPU, else the CPU one."""
    return BACKENDS.get(device.type, BACKENDS["cpu"])
