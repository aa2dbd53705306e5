"""Weight-only quantization of the emulator's frozen middle linears (int8 and int4).

Schemes (``QuantScheme``):
- **int8**: symmetric, one scale per output channel; ``qweight`` int8 ``[out, in]``.
- **int4**: asymmetric, one scale and zero point per group of ``group_size`` input channels;
  two 4-bit codes per byte (low nibble = even column) in ``qweight`` uint8 ``[out, in / 2]``,
  ``zeros`` uint8 ``[out, groups]``. A layer whose width is not a multiple of the group size uses
  one group per row; the group count is read back from the ``scales`` shape.

Activation-aware scaling (the AWQ idea): channels that carry large activations matter most, so
before quantizing, each input column of W is multiplied by ``s = mean|x|^alpha`` and the input is
divided by ``s`` at run time (``input_scale``). ``alpha`` is searched per layer on calibration
activations to minimise the output error; ``alpha = 0`` is plain round-to-nearest, so the search
never does worse than RTN on the calibration set.

``QuantLinear`` is the reference path: it dequantizes on the fly in forward and again in backward,
computes only the gradient with respect to its input (its weights are frozen) and keeps nothing
dequantized between the two. Fast kernels (client issue) plug in behind the same buffers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from emulator.calibration import Activations
from emulator.surgery import linear_weight, replace_module

log = logging.getLogger(__name__)

SCHEMES = ("int8", "int4")
_ALPHAS = tuple(i / 10 for i in range(11))
_MIN_SCALE = 2.0**-14  # smallest normal float16: scales are stored as float16


@dataclass(frozen=True)
class QuantScheme:
    """How the emulator's middle linears are stored; recorded in the bundle manifest."""

    name: str  # "int8" | "int4"
    group_size: int = 64  # int4 only
    awq: bool = True

    def __post_init__(self) -> None:
        if self.name not in SCHEMES:
            raise ValueError(f"unknown quantization scheme {self.name!r}; use one of {SCHEMES}")
        if self.name == "int4" and (self.group_size < 2 or self.group_size % 2):
            raise ValueError("int4 group_size must be an even number >= 2")

    @property
    def bits(self) -> int:
        return 8 if self.name == "int8" else 4

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["bits"] = self.bits
        if self.name == "int8":
            out["group_size"] = 0  # per output channel
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantScheme:
        return cls(str(data["name"]), int(data.get("group_size") or 64), bool(data.get("awq")))


@dataclass
class QuantizedWeight:
    """The stored form of one linear's weight (see module docstring for the layout)."""

    qweight: torch.Tensor
    scales: torch.Tensor  # float16 [out, groups]
    zeros: torch.Tensor | None  # uint8 [out, groups], int4 only
    in_features: int

    @property
    def bits(self) -> int:
        return 8 if self.qweight.dtype == torch.int8 else 4


def _groups(in_features: int, scheme: QuantScheme) -> int:
    if scheme.name == "int8":
        return 1
    if in_features % 2:
        raise ValueError(f"int4 needs an even input width, got {in_features}")
    return in_features // scheme.group_size if in_features % scheme.group_size == 0 else 1


def quantize_weight(weight: torch.Tensor, scheme: QuantScheme) -> QuantizedWeight:
    """Quantize a ``[out, in]`` weight by ``scheme`` (round to nearest)."""
    w = weight.detach().float()
    out_features, in_features = w.shape
    groups = _groups(in_features, scheme)
    grouped = w.reshape(out_features, groups, in_features // groups)
    if scheme.name == "int8":
        scale = (grouped.abs().amax(-1) / 127).clamp(min=_MIN_SCALE).half()
        q = (grouped / scale.float().unsqueeze(-1)).round().clamp(-127, 127)
        codes = q.reshape(out_features, in_features).to(torch.int8)
        return QuantizedWeight(codes, scale, None, in_features)
    low, high = grouped.amin(-1), grouped.amax(-1)
    scale = ((high - low) / 15).clamp(min=_MIN_SCALE).half()
    zero = (-low / scale.float()).round().clamp(0, 15)
    q = ((grouped / scale.float().unsqueeze(-1)).round() + zero.unsqueeze(-1)).clamp(0, 15)
    codes = q.reshape(out_features, in_features).to(torch.uint8)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return QuantizedWeight(packed, scale, zero.to(torch.uint8), in_features)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 ``[out, in/2]`` → codes 0..15 as uint8 ``[out, in]``."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1)


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The reference dequantization: stored form → ``[out, in]`` weight in ``dtype``."""
    out_features, groups = scales.shape
    if qweight.dtype == torch.int8:
        values = qweight.to(dtype).reshape(out_features, groups, -1)
        return (values * scales.to(dtype).unsqueeze(-1)).reshape(out_features, -1)
    if zeros is None:
        raise ValueError("int4 weights need their zero points")
    codes = unpack_int4(qweight).to(dtype).reshape(out_features, groups, -1)
    shifted = codes - zeros.to(dtype).unsqueeze(-1)
    return (shifted * scales.to(dtype).unsqueeze(-1)).reshape(out_features, -1)


def error_bound(q: QuantizedWeight) -> torch.Tensor:
    """Per-element bound on |W - dequantize(W)| (half a step of its group), ``[out, in]``."""
    step = q.scales.float().repeat_interleave(q.in_features // q.scales.shape[1], dim=1)
    return step / 2


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


class _QuantLinearFunction(torch.autograd.Function):
    """y = (x / s) · deq(W)ᵀ + b; backward gives dL/dx only and re-dequantizes W."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
        input_scale: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            weight = dequantize(qweight, scales, zeros, dtype)
            scaled = x.to(dtype) / input_scale.to(dtype)
            out = nn.functional.linear(scaled, weight, None if bias is None else bias.to(dtype))
        ctx.save_for_backward(qweight, scales, zeros, input_scale)
        ctx.compute_dtype, ctx.input_dtype = dtype, x.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        qweight, scales, zeros, input_scale = ctx.saved_tensors
        dtype = ctx.compute_dtype
        weight = dequantize(qweight, scales, zeros, dtype)
        grad_scaled = grad_out.to(dtype) @ weight
        grad_x = (grad_scaled / input_scale.to(dtype)).to(ctx.input_dtype)
        return grad_x, None, None, None, None, None


class QuantLinear(nn.Module):
    """A frozen linear layer on int8/int4 weights (drop-in for ``nn.Linear`` in the emulator)."""

    # buffers (registered in __init__)
    qweight: torch.Tensor
    zeros: torch.Tensor | None  # int4 only
    scales: torch.Tensor
    input_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self, in_features: int, out_features: int, bits: int, groups: int, bias: bool
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        if bits == 8:
            qweight = torch.zeros(out_features, in_features, dtype=torch.int8)
            zeros = None
        else:
            qweight = torch.zeros(out_features, in_features // 2, dtype=torch.uint8)
            zeros = torch.zeros(out_features, groups, dtype=torch.uint8)
        self.register_buffer("qweight", qweight)
        self.register_buffer("zeros", zeros)
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float16))
        self.register_buffer("input_scale", torch.ones(in_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_weight(
        cls, q: QuantizedWeight, input_scale: torch.Tensor, bias: torch.Tensor | None
    ) -> QuantLinear:
        layer = cls(q.in_features, q.scales.shape[0], q.bits, q.scales.shape[1], bias is not None)
        layer.qweight.copy_(q.qweight)
        layer.scales.copy_(q.scales)
        if q.zeros is not None:
            assert layer.zeros is not None  # an int4 layer, built with its zero points
            layer.zeros.copy_(q.zeros)
        layer.input_scale.copy_(input_scale.float())
        if bias is not None:
            assert layer.bias is not None  # built with bias=True
            layer.bias.copy_(bias.detach().float())
        return layer

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The effective ``[out, in]`` weight (input scaling folded back in)."""
        return dequantize(self.qweight, self.scales, self.zeros, dtype) / self.input_scale.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = _QuantLinearFunction.apply(  # type: ignore[no-untyped-call]  # torch: apply is unannotated
            x, self.qweight, self.scales, self.zeros, self.input_scale, self.bias
        )
        return out

    def extra_repr(self) -> str:
        bits = 8 if self.qweight.dtype == torch.int8 else 4
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, int{bits}, "
            f"groups={self.scales.shape[1]}, bias={self.bias is not None}"
        )


def search_input_scale(
    weight: torch.Tensor, activations: Activations, scheme: QuantScheme
) -> tuple[torch.Tensor, float, float]:
    """The AWQ search: (input scale, chosen alpha, relative output error) for one linear."""
    w = weight.detach().float()
    x = activations.rows
    reference = x @ w.t()
    norm = reference.pow(2).mean().clamp(min=1e-12)
    mean_abs = activations.mean_abs().clamp(min=1e-8)
    best: tuple[torch.Tensor, float, float] | None = None
    for alpha in _ALPHAS if scheme.awq else (0.0,):
        s = mean_abs.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        q = quantize_weight(w * s, scheme)
        approx = (x / s) @ dequantize(q.qweight, q.scales, q.zeros).t()
        error = float((approx - reference).pow(2).mean() / norm)
        if best is None or error < best[2]:
            best = (s, alpha, error)
    assert best is not None
    return best


def quantize_linears(
    model: nn.Module,
    linears: Mapping[str, nn.Module],
    scheme: QuantScheme,
    activations: Mapping[str, Activations] | None = None,
) -> dict[str, Any]:
    """Replace each of ``linears`` (qualified names in ``model``) by a ``QuantLinear``.

    Without ``activations`` (or for a layer that saw none) the weight is quantized as is.
    Returns a report: per-layer chosen alpha and relative output error on calibration rows.
    """
    layers: dict[str, Any] = {}
    for name, module in linears.items():
        found = linear_weight(module)
        if found is None:
            raise ValueError(f"{name} is not a linear layer")
        weight, bias = found
        seen = activations.get(name) if activations else None
        if seen is not None and seen.rows.shape[0]:
            scale, alpha, error = search_input_scale(weight, seen, scheme)
            layers[name] = {"alpha": alpha, "relative_error": error}
        else:
            scale = torch.ones(weight.shape[1])
        q = quantize_weight(weight.float() * scale.to(weight.device), scheme)
        new = QuantLinear.from_weight(q, scale, bias).to(weight.device)
        replace_module(model, name, new)
    errors = [v["relative_error"] for v in layers.values()]
    return {
        "layers": len(linears),
        "calibrated": len(layers),
        "mean_relative_error": sum(errors) / len(errors) if errors else None,
        "mean_alpha": sum(v["alpha"] for v in layers.values()) / len(layers) if layers else None,
    }


def install_quant_layers(
    model: nn.Module, names: Iterable[str], tensors: Mapping[str, Mapping[str, Any]]
) -> None:
    """Put empty ``QuantLinear`` layers at ``names``, shaped from the manifest's tensor table."""
    for name in names:
        qweight = tensors.get(f"{name}.qweight")
        scales = tensors.get(f"{name}.scales")
        if qweight is None or scales is None:
            raise ValueError(f"quantized layer {name} has no qweight/scales tensors")
        out_features, columns = qweight["shape"]
        bits = 8 if qweight["dtype"] == "I8" else 4
        in_features = columns if bits == 8 else 2 * columns
        layer = QuantLinear(
            in_features, out_features, bits, scales["shape"][1], f"{name}.bias" in tensors
        )
        replace_module(model, name, layer)


__all__ = [
    "SCHEMES",
    "QuantLinear",
    "QuantScheme",
    "QuantizedWeight",
    "dequantize",
    "error_bound",
    "install_quant_layers",
    "quantize_linears",
    "quantize_weight",
    "search_input_scale",
    "unpack_int4",
]
