"""Integer matmuls for int8 frozen linears: int8 activations × int8 weights, int32 sums.

An int8 bundle's linears carry per-output-channel int8 codes (``W = codes · s_w``). Used as
weights only, they are dequantized into the bf16 matmul, which makes them no faster than bf16
weights. CPUs with int8 dot-product instructions (AVX-512 VNNI, AVX-VNNI, AMX) multiply int8
faster than bf16 (``torch._int_mm`` against the bf16 matmul at SmolLM2's shapes; the
client's throughput with it: bench/reports/client.md). So the *other* operand is quantized on
the fly, one scale per row (per token in forward, per token of the upstream gradient in
backward, symmetric absmax):

    y  = (q_x · q_wᵀ) · s_x · s_w                 (forward)
    dx = (q_g · q_w) · s_g,  g = dy · s_w         (the input gradient; no weight gradient)

and nothing is kept for backward but the codes the layer holds anyway. Quantizing and
dequantizing run in ``client.kernels.native``'s C loops, one pass each (as torch ops they
take 4-5 passes, which cost more than the integer matmul saves), or in the same arithmetic in
torch ops where no C
compiler is available. The rounding is that of dynamic per-token int8 quantization: relative
error 0.8-0.9 % against the dequantized fp32 product at SmolLM2's shapes (bf16: 0.2 %),
bounded in tests.
"""

from __future__ import annotations

import torch

from client.kernels import native
from offsite.host.cpu import cpu_flags

INT8_DOT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
TINY = torch.finfo(torch.float32).tiny  # an all-zero row keeps a finite scale


def cpu_has_int8_dot() -> bool:
    """Whether this CPU has int8 dot-product instructions."""
    return bool(INT8_DOT_FLAGS & cpu_flags())


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _native_takes(tensor: torch.Tensor, dtype: torch.dtype, *factors: torch.Tensor | None) -> bool:
    """Whether the C loops take these operands: CPU, the dtype they are written for, and
    contiguous fp32 factors (anything else goes to the torch ops)."""
    return (
        tensor.device.type == "cpu"
        and tensor.dtype == dtype
        and all(f is None or (f.dtype == torch.float32 and f.is_contiguous()) for f in factors)
    )


def quantize_rows(
    x: torch.Tensor, col_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of a 2-D tensor (times ``col_scale`` [cols], fp32, if given), one
    fp32 scale per row: ``x · col_scale ≈ codes · scale`` [rows, 1]. bf16 on CPU takes the C
    loop, anything else the same arithmetic in torch ops."""
    lib = native.library()
    if lib is None or not _native_takes(x, torch.bfloat16, col_scale):
        scaled = x.float() if col_scale is None else x.float() * col_scale
        amax = scaled.abs().amax(dim=1, keepdim=True).clamp_(min=TINY)
        inverse = torch.full_like(amax, 127.0).div_(amax)  # `127 / amax` would take 1/amax · 127
        codes = torch.mul(scaled, inverse).round_().to(torch.int8)
        return codes, amax.div_(127.0)
    x = x.contiguous()
    codes = torch.empty(x.shape, dtype=torch.int8)
    scale = torch.empty(x.shape[0], 1, dtype=torch.float32)
    lib.offsite_quantize_rows_bf16(
        x.data_ptr(),
        x.shape[0],
        x.shape[1],
        _pointer(col_scale),
        codes.data_ptr(),
        scale.data_ptr(),
        torch.get_num_threads(),
    )
    return codes, scale


def dequantize_rows(
    sums: torch.Tensor, row_scale: torch.Tensor, col_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """``sums [rows, cols] (int32) · row_scale [rows, 1] · col_scale [cols]`` in bf16."""
    lib = native.library()
    if lib is None or not _native_takes(sums, torch.int32, row_scale, col_scale):
        scaled = sums.float() * row_scale
        return (scaled if col_scale is None else scaled * col_scale).to(torch.bfloat16)
    sums, out = sums.contiguous(), torch.empty(sums.shape, dtype=torch.bfloat16)
    lib.offsite_dequantize_rows_bf16(
        sums.data_ptr(),
        sums.shape[0],
        sums.shape[1],
        row_scale.data_ptr(),
        _pointer(col_scale),
        out.data_ptr(),
        torch.get_num_threads(),
    )
    return out


def forward_sums(
    x: torch.Tensor, codes: torch.Tensor, input_factor: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The int32 sums of ``x [M, in] · input_factor`` quantized per row times ``codesᵀ`` [out,
    in], and the rows' scales: ``int8_forward`` before its dequantizing pass."""
    q, row_scale = quantize_rows(x, input_factor)
    return torch._int_mm(q, codes.t()), row_scale


def input_grad_sums(
    grad: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The int32 sums of ``grad [M, out] · scales`` quantized per row times ``codes`` [out, in],
    and the rows' scales: ``int8_input_grad`` before its dequantizing pass."""
    q, row_scale = quantize_rows(grad, scales)
    return torch._int_mm(q, codes), row_scale


def int8_forward(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    input_factor: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(x [M, in] · input_factor [in]) · Wᵀ`` in bf16 for ``W = codes [out, in] · scales
    [out]`` (fp32 factors; ``input_factor`` None: all ones)."""
    return dequantize_rows(*forward_sums(x, codes, input_factor), scales)


def int8_input_grad(
    grad: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    input_factor: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(grad [M, out] · W) · input_factor [in]`` in bf16 for ``W = codes [out, in] · scales
    [out]`` (fp32 factors; ``input_factor`` None: all ones)."""
    return dequantize_rows(*input_grad_sums(grad, codes, scales), input_factor)
