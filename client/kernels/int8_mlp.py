"""A frozen gated MLP on int8 × int8 matmuls with the elementwise work fused between them.

In an int8 emulator block on a CPU with int8 dot products, ``down(silu(gate(x)) * up(x))`` is
three ``PackedLinear`` layers on ``client.kernels.int8_matmul`` around ``GatedProduct``. Layer
by layer, the int32 sums of gate and up are each turned into bf16, the activation and the
product each make a pass, and the product is quantized again for ``down``; coming back, the
product's gradient is dequantized, goes through four passes (the activation recomputed, two
products, its derivative), is quantized twice for gate and up, and their two input gradients
are dequantized and summed: fifteen elementwise passes over [tokens, intermediate] or
[tokens, hidden] tensors per MLP and step, each cheap next to the matmuls but together a large
share of the MLP's time on a CPU of few cores (the client's throughput: bench/reports/client.md).

Here the MLP is one autograd function with the same three integer matmuls each way and three
fused passes in ``client.kernels.native`` instead:

- forward: gate and up sums → bf16 ``gate`` and ``up`` (kept for backward, as ``GatedProduct``
  keeps them) and ``silu(gate) · up`` quantized per row for ``down``;
- backward: ``down``'s input-gradient sums → the gradients of gate and up, each quantized per
  row for its layer's input-gradient matmul;
- the two input gradients summed in fp32 and rounded to bf16 once.

Values between the int32 sums and the int8 codes stay in fp32 (the layer-by-layer path rounds
them to bf16 four times), and the sigmoid is a polynomial ``exp`` (~1 ulp in fp32), so results
differ from that path by rounding only; both are bounded against the dequantized fp32 MLP in
tests. Memory is that of ``GatedProduct``: gate and up in bf16, nothing else.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any, cast

import torch

from client.kernels import native
from client.kernels.backends import FUSED_INT8_MAX_ROWS, int8_factors, integer_matmuls
from client.kernels.int8_matmul import dequantize_rows, forward_sums, input_grad_sums
from client.kernels.linear import PackedLinear
from client.kernels.packed import PackedWeight

if TYPE_CHECKING:  # lean imports this module
    from client.kernels.lean import LeanGatedMLP

# activations that compute ``F.silu``: torch's module and transformers' (lean runtime and PEFT)
SILU_TYPES = frozenset({"SiLU", "SiLUActivation"})


@lru_cache(maxsize=8)
def _ones(size: int) -> torch.Tensor:
    return torch.ones(size)


def _factors(weight: PackedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's weight scales and inverse input scale (ones without one), fp32."""
    scales, inverse = int8_factors(weight)
    return scales, _ones(weight.in_features) if inverse is None else inverse


def takes(mlp: LeanGatedMLP, x: torch.Tensor) -> bool:
    """Whether ``int8_gated_mlp`` computes this MLP on this input: SiLU gating over three
    bias-free per-channel int8 ``PackedLinear`` layers on the integer matmuls, a CPU input of
    more rows than the fused int8 kernel's, and the native loops built."""
    if type(mlp.act_fn).__name__ not in SILU_TYPES:
        return False
    layers = [m for m in (mlp.gate, mlp.up, mlp.down) if type(m) is PackedLinear]
    if len(layers) != 3:
        return False
    if x.device.type != "cpu" or x.numel() // x.shape[-1] <= FUSED_INT8_MAX_ROWS:
        return False
    weights = [m.packed for m in layers]
    if not all(integer_matmuls(w) and w.bias is None for w in weights):
        return False
    return native.library() is not None


class _Int8GatedMLP(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, gate: PackedWeight, up: PackedWeight, down: PackedWeight
    ) -> torch.Tensor:
        lib, threads = native.loaded(), torch.get_num_threads()
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
        count, inner = rows.shape[0], gate.out_features
        (gate_scales, gate_inverse), (up_scales, up_inverse) = _factors(gate), _factors(up)
        down_scales, down_inverse = _factors(down)
        gate_sums, gate_rows = forward_sums(rows, gate.codes, gate_inverse)
        up_sums, up_rows = forward_sums(rows, up.codes, up_inverse)
        gated = torch.empty(count, inner, dtype=torch.bfloat16)
        upped = torch.empty(count, inner, dtype=torch.bfloat16)
        codes = torch.empty(count, inner, dtype=torch.int8)
        scale = torch.empty(count, 1, dtype=torch.float32)
        scratch = torch.empty(threads, inner, dtype=torch.float32)
        lib.offsite_swiglu_quantize(
            gate_sums.data_ptr(),
            gate_rows.data_ptr(),
            gate_scales.data_ptr(),
            up_sums.data_ptr(),
            up_rows.data_ptr(),
            up_scales.data_ptr(),
            down_inverse.data_ptr(),
            count,
            inner,
            gated.data_ptr(),
            upped.data_ptr(),
            codes.data_ptr(),
            scale.data_ptr(),
            scratch.data_ptr(),
            threads,
        )
        del gate_sums, up_sums
        out = dequantize_rows(torch._int_mm(codes, down.codes.t()), scale, down_scales)
        ctx.save_for_backward(gated, upped)
        ctx.weights, ctx.input_shape, ctx.input_dtype = (gate, up, down), x.shape, x.dtype
        out_dtype = torch.bfloat16 if torch.is_autocast_enabled("cpu") else x.dtype
        return out.reshape(*x.shape[:-1], down.out_features).to(out_dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        lib, threads = native.loaded(), torch.get_num_threads()
        gated, upped = ctx.saved_tensors
        gate, up, down = ctx.weights
        (gate_scales, gate_inverse), (up_scales, up_inverse) = _factors(gate), _factors(up)
        down_scales, down_inverse = _factors(down)
        dy = grad.reshape(-1, down.out_features).to(torch.bfloat16).contiguous()
        count, inner = gated.shape
        sums, dy_rows = input_grad_sums(dy, down.codes, down_scales)  # product's gradient
        gate_codes = torch.empty(count, inner, dtype=torch.int8)
        up_codes = torch.empty(count, inner, dtype=torch.int8)
        gate_rows = torch.empty(count, 1, dtype=torch.float32)
        up_rows = torch.empty(count, 1, dtype=torch.float32)
        scratch = torch.empty(threads, 2 * inner, dtype=torch.float32)
        lib.offsite_swiglu_backward_quantize(
            sums.data_ptr(),
            dy_rows.data_ptr(),
            down_inverse.data_ptr(),
            gated.data_ptr(),
            upped.data_ptr(),
            gate_scales.data_ptr(),
            up_scales.data_ptr(),
            count,
            inner,
            gate_codes.data_ptr(),
            gate_rows.data_ptr(),
            up_codes.data_ptr(),
            up_rows.data_ptr(),
            scratch.data_ptr(),
            threads,
        )
        del sums
        through_gate = torch._int_mm(gate_codes, gate.codes)
        through_up = torch._int_mm(up_codes, up.codes)
        dx = torch.empty(count, gate.in_features, dtype=torch.bfloat16)
        lib.offsite_dequantize_sum_bf16(
            through_gate.data_ptr(),
            gate_rows.data_ptr(),
            gate_inverse.data_ptr(),
            through_up.data_ptr(),
            up_rows.data_ptr(),
            up_inverse.data_ptr(),
            count,
            gate.in_features,
            dx.data_ptr(),
            threads,
        )
        return dx.reshape(ctx.input_shape).to(ctx.input_dtype), None, None, None


def int8_gated_mlp(x: torch.Tensor, mlp: LeanGatedMLP) -> torch.Tensor:
    """``down(silu(gate(x)) · up(x))`` for an MLP ``takes`` accepts, with the input gradient
    only (its layers are frozen)."""
    layers = [cast(PackedLinear, m) for m in (mlp.gate, mlp.up, mlp.down)]  # as takes() checked
    out: torch.Tensor = _Int8GatedMLP.apply(x, *(m.packed for m in layers))  # type: ignore[no-untyped-call]  # torch: apply is unannotated
    return out
