"""Packed frozen weights in the layout the kernels read fastest, prepared once per layer.

The bundle stores int4 codes interleaved (low nibble = even column, the common on-disk layout).
Unpacking that takes a stack and an interleaving copy per call; here each row is repacked
*planar* (low nibble = first half of the row, high nibble = second half), so unpacking is two
bitwise ops and one concatenation. Zero points are folded into a per-group offset
(``w = code · scale + offset``, ``offset = -zero · scale``) so dequantization is one fused
multiply-add per element. Scales and offsets are kept in the compute dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from emulator.quant import QuantLinear, unpack_int4


@dataclass
class PackedWeight:
    """One frozen linear's weight, ready for ``client.kernels`` (see module docstring)."""

    codes: torch.Tensor  # int8 [out, in] or planar uint8 [out, in / 2]
    scales: torch.Tensor  # [out, groups], compute dtype
    offsets: torch.Tensor | None  # int4: [out, groups] = -zero · scale; int8: None
    input_scale: torch.Tensor | None  # [in] activation-aware divisor, None when all ones
    bias: torch.Tensor | None  # [out], compute dtype
    in_features: int
    out_features: int
    # derived once, for the integer matmuls (``client.kernels.int8_matmul``) of per-channel
    # int8 weights: the scales and the input scale's inverse as contiguous fp32 vectors
    fp32_scales: torch.Tensor | None = None  # [out]
    fp32_inverse_input: torch.Tensor | None = None  # [in], None when there is no input scale

    @property
    def bits(self) -> int:
        return 8 if self.codes.dtype == torch.int8 else 4

    @property
    def groups(self) -> int:
        return int(self.scales.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.scales.dtype

    def nbytes(self) -> int:
        parts = (self.codes, self.scales, self.offsets, self.input_scale, self.bias)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


def planar_int4(interleaved: torch.Tensor) -> torch.Tensor:
    """uint8 ``[out, in/2]`` interleaved codes → planar packing of the same codes."""
    codes = unpack_int4(interleaved)
    half = codes.shape[1] // 2
    return (codes[:, :half] | (codes[:, half:] << 4)).contiguous()


def unpack_planar(codes: torch.Tensor) -> torch.Tensor:
    """Planar uint8 ``[rows, in/2]`` → codes 0..15 ``[rows, in]`` (uint8)."""
    return torch.cat((codes & 0x0F, codes >> 4), dim=1)


def pack_layer(layer: QuantLinear, dtype: torch.dtype) -> PackedWeight:
    """The kernel form of an emulator ``QuantLinear`` for compute in ``dtype``."""
    scales = layer.scales.to(dtype)
    if layer.qweight.dtype == torch.int8:
        codes, offsets = layer.qweight.contiguous(), None
    else:
        assert layer.zeros is not None
        codes = planar_int4(layer.qweight)
        offsets = (-layer.zeros.float() * layer.scales.float()).to(dtype)
    input_scale = layer.input_scale.float()
    divisor = None if bool((input_scale == 1).all()) else input_scale.to(dtype)
    bias = None if layer.bias is None else layer.bias.to(dtype)
    fp32_scales = scales[:, 0].float().contiguous() if scales.shape[1] == 1 else None
    inverse = None if divisor is None else divisor.float().reciprocal()
    return PackedWeight(
        codes,
        scales,
        offsets,
        divisor,
        bias,
        layer.in_features,
        layer.out_features,
        fp32_scales,
        inverse,
    )


def dequantize_rows(weight: PackedWeight, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of the weight in its compute dtype (input scaling not applied)."""
    rows = stop - start
    scales = weight.scales[start:stop].unsqueeze(-1)
    if weight.bits == 8:
        values = weight.codes[start:stop].to(weight.dtype).reshape(rows, weight.groups, -1)
        return (values * scales).reshape(rows, weight.in_features)
    assert weight.offsets is not None
    codes = unpack_planar(weight.codes[start:stop]).to(weight.dtype)
    values = codes.reshape(rows, weight.groups, -1)
    offsets = weight.offsets[start:stop].unsqueeze(-1)
    return torch.addcmul(offsets, values, scales).reshape(rows, weight.in_features)
