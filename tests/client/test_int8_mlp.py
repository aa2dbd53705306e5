"""client.kernels.int8_mlp: a frozen int8 gated MLP fused between its integer matmuls gives the
layer-by-layer path's numbers up to rounding, keeps only gate and up, and is taken only where
it applies."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from client.kernels import PackedLinear, backends, int8_mlp, native
from client.kernels.lean import GatedProduct, LeanGatedMLP
from tests.client.test_kernels import BOUNDS, _layer, _relative

HIDDEN, INNER = 96, 256


class _MLP(nn.Module):
    def __init__(self, bias: bool = False, act: nn.Module | None = None) -> None:
        super().__init__()
        self.gate_proj = PackedLinear.from_quant(
            _layer("int8", (INNER, HIDDEN), bias, seed=1), torch.bfloat16
        )
        self.up_proj = PackedLinear.from_quant(
            _layer("int8", (INNER, HIDDEN), bias, seed=2), torch.bfloat16
        )
        self.down_proj = PackedLinear.from_quant(
            _layer("int8", (HIDDEN, INNER), bias, seed=3), torch.bfloat16
        )
        self.act_fn = act or nn.SiLU()


def _dequantized(layer: PackedLinear) -> torch.Tensor:
    """The layer's effective fp32 weight: codes · scales / input scale."""
    weight = layer.codes.float() * layer.scales.float()
    return weight if layer.input_scale is None else weight / layer.input_scale.float()


def _fp32_mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate = x @ _dequantized(mlp.gate_proj).t()
    up = x @ _dequantized(mlp.up_proj).t()
    return (nn.functional.silu(gate) * up) @ _dequantized(mlp.down_proj).t()


def _layer_by_layer(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The path the fusion replaces: each linear on its own, ``GatedProduct`` between."""
    product = GatedProduct.apply(mlp.gate_proj(x), mlp.up_proj(x), mlp.act_fn)
    return mlp.down_proj(product)


@pytest.fixture
def vnni(monkeypatch: pytest.MonkeyPatch) -> None:
    """Integer matmuls on, as on a CPU with int8 dot products (torch._int_mm runs anywhere)."""
    monkeypatch.setattr(backends, "cpu_has_int8_dot", lambda: True)


def _inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 30, HIDDEN, generator=generator)
    grad = torch.randn(4, 30, HIDDEN, generator=generator)
    return x, grad


@pytest.mark.usefixtures("vnni")
def test_the_fused_mlp_matches_the_layer_by_layer_path_and_the_fp32_mlp() -> None:
    """Output and input gradient: no further from the fp32 MLP on the dequantized weights than
    the layer-by-layer int8 path (which rounds to bf16 in between where the fusion keeps fp32),
    and within rounding of that path."""
    mlp = _MLP()
    lean = LeanGatedMLP(mlp)
    x, grad = _inputs(0)
    assert int8_mlp.takes(lean, x.to(torch.bfloat16))
    x_ref = x.clone().requires_grad_(True)
    expected = _fp32_mlp(mlp, x_ref)
    expected.backward(grad)
    results = {}
    for name, run in (("fused", lean), ("layers", lambda t: _layer_by_layer(mlp, t))):
        x_bf16 = x.to(torch.bfloat16).requires_grad_(True)
        out = run(x_bf16)
        out.backward(grad.to(torch.bfloat16))
        assert x_bf16.grad is not None and out.dtype == torch.bfloat16
        results[name] = (out, x_bf16.grad)
    assert x_ref.grad is not None
    (out, dx), (layers_out, layers_dx) = results["fused"], results["layers"]
    bound = 3 * BOUNDS[torch.bfloat16]  # three chained products, each within the bf16 bound
    assert _relative(out, expected) < bound and _relative(dx, x_ref.grad) < bound
    assert _relative(out, expected) <= 1.1 * _relative(layers_out, expected)
    assert _relative(dx, x_ref.grad) <= 1.1 * _relative(layers_dx, x_ref.grad)
    assert _relative(out, layers_out) < bound / 3 and _relative(dx, layers_dx) < bound / 3


@pytest.mark.usefixtures("vnni")
def test_the_fused_mlp_takes_three_integer_matmuls_each_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[int, ...]] = []
    real = torch._int_mm

    def counting(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        calls.append((*a.shape, b.shape[1]))
        return real(a, b)

    monkeypatch.setattr(torch, "_int_mm", counting)
    x, grad = _inputs(1)
    x = x.to(torch.bfloat16).requires_grad_(True)
    out = LeanGatedMLP(_MLP())(x)
    assert len(calls) == 3  # gate, up, down
    out.backward(grad.to(torch.bfloat16))
    rows = x.shape[0] * x.shape[1]
    assert calls[3:] == [(rows, HIDDEN, INNER), (rows, INNER, HIDDEN), (rows, INNER, HIDDEN)]


@pytest.mark.usefixtures("vnni")
def test_the_fused_mlp_keeps_only_gate_and_up_for_backward() -> None:
    """As ``GatedProduct``: two bf16 [rows, inner] tensors, no activation, no input."""
    saved: list[torch.Tensor] = []

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    lean = LeanGatedMLP(_MLP())
    x = _inputs(2)[0].to(torch.bfloat16).requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out = lean(x)
    rows = x.shape[0] * x.shape[1]
    assert [(tuple(t.shape), t.dtype) for t in saved] == [((rows, INNER), torch.bfloat16)] * 2
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        _layer_by_layer(lean, x)
    assert sum(t.nbytes for t in saved[2:]) == sum(t.nbytes for t in saved[:2])
    assert out.requires_grad


@pytest.mark.usefixtures("vnni")
def test_the_fused_mlp_applies_only_where_it_can(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bias, another activation, a float layer, a few rows (the fused weight-only kernel's
    range), a CPU without int8 dot products or no native loops: the layer-by-layer path."""
    x = _inputs(3)[0].to(torch.bfloat16)
    assert int8_mlp.takes(LeanGatedMLP(_MLP()), x)
    assert not int8_mlp.takes(LeanGatedMLP(_MLP(bias=True)), x)
    assert not int8_mlp.takes(LeanGatedMLP(_MLP(act=nn.GELU())), x)
    floats = _MLP()
    floats.up_proj = nn.Linear(HIDDEN, INNER, bias=False)  # a LoRA base left in float, say
    assert not int8_mlp.takes(LeanGatedMLP(floats), x)
    assert not int8_mlp.takes(LeanGatedMLP(_MLP()), x[:1, :16])
    monkeypatch.setattr(native, "library", lambda: None)
    assert not int8_mlp.takes(LeanGatedMLP(_MLP()), x)
    monkeypatch.undo()
    monkeypatch.setattr(backends, "cpu_has_int8_dot", lambda: False)
    assert not int8_mlp.takes(LeanGatedMLP(_MLP()), x)


@pytest.mark.usefixtures("vnni")
def test_without_native_loops_the_mlp_computes_layer_by_layer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(native, "library", lambda: None)
    mlp = _MLP()
    x = _inputs(4)[0].to(torch.bfloat16)
    assert torch.equal(LeanGatedMLP(mlp)(x), _layer_by_layer(mlp, x))
