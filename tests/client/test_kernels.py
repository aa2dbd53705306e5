"""client.kernels: packed int8/int4 linears against the dequantized fp32 reference.

Bounds: in fp32 the kernels do the same arithmetic as the reference up to summation order, so
outputs and input gradients agree to 1e-4 relative (of the output's max magnitude). In bf16
every operand is rounded to 8 mantissa bits: the bound is 2e-2 relative, a few bf16 ulps of
accumulated rounding over K ≤ 384 products.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from client.kernels import BACKENDS, PackedLinear, freeze_float_linears, install_kernels
from client.kernels.backends import FUSED_INT8_MAX_ROWS, blocked_backward, blocked_forward
from client.kernels.packed import pack_layer, planar_int4, unpack_planar
from emulator.quant import QuantLinear, QuantScheme, quantize_weight, unpack_int4
from tests.conftest import VOCAB, tiny_model

SCHEMES = {"int8": QuantScheme("int8"), "int4": QuantScheme("int4", group_size=64)}
SHAPES = [(96, 128), (33, 64), (200, 384), (17, 36)]  # (out, in); 36 → one int4 group per row
BOUNDS = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _layer(scheme: str, shape: tuple[int, int], bias: bool = True, seed: int = 0) -> QuantLinear:
    generator = torch.Generator().manual_seed(seed)
    out_features, in_features = shape
    weight = torch.randn(shape, generator=generator) * 0.05
    input_scale = torch.rand(in_features, generator=generator) + 0.5
    q = quantize_weight(weight * input_scale, SCHEMES[scheme])
    b = torch.randn(out_features, generator=generator) if bias else None
    return QuantLinear.from_weight(q, input_scale, b)


def _reference(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """fp32 reference: the effective dequantized weight in a plain linear."""
    bias = None if layer.bias is None else layer.bias.float()
    return nn.functional.linear(x.float(), layer.dequantized_weight(torch.float32), bias)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_forward_and_input_gradient_match_the_reference(
    scheme: str, shape: tuple[int, int], dtype: torch.dtype
) -> None:
    layer = _layer(scheme, shape)
    fast = PackedLinear.from_quant(layer, dtype)
    x = torch.randn(3, 40, shape[1], generator=torch.Generator().manual_seed(1))
    grad = torch.randn(3, 40, shape[0], generator=torch.Generator().manual_seed(2))

    x_ref = x.clone().requires_grad_(True)
    expected = _reference(layer, x_ref)
    expected.backward(grad)
    x_fast = x.clone().to(dtype).requires_grad_(True)
    out = fast(x_fast)
    out.backward(grad.to(dtype))

    assert out.shape == expected.shape and out.dtype == dtype
    assert _relative(out, expected) < BOUNDS[dtype]
    assert x_fast.grad is not None and x_ref.grad is not None
    assert _relative(x_fast.grad, x_ref.grad) < BOUNDS[dtype]


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_backends_agree_and_blocking_changes_nothing(scheme: str) -> None:
    """The CUDA backend's code runs on CPU tensors here; row blocks of any size sum exactly."""
    layer = _layer(scheme, (200, 384))
    packed = pack_layer(layer, torch.float32)
    raw = torch.randn(64, 384, generator=torch.Generator().manual_seed(3))
    x = raw / packed.input_scale
    dy = torch.randn(64, 200, generator=torch.Generator().manual_seed(4))
    whole = blocked_forward(x, packed, 1 << 30)
    whole_dx = blocked_backward(dy, packed, 1 << 30) / packed.input_scale
    for name, backend in BACKENDS.items():  # backends divide by the input scale themselves
        got = backend.forward(raw, packed, backend.block_elements)
        assert _relative(got, whole) < 1e-5, name
        got_dx = backend.backward(dy, packed, backend.block_elements)
        assert _relative(got_dx, whole_dx) < 1e-5, name
    for block in (384, 384 * 7, 384 * 64):  # 1, 7 and 64 rows per block
        assert _relative(blocked_forward(x, packed, block), whole) < 1e-5
        assert (
            _relative(blocked_backward(dy, packed, block), blocked_backward(dy, packed, 1 << 30))
            < 1e-5
        )


def test_few_rows_use_the_fused_int8_kernel_with_the_same_result() -> None:
    layer = _layer("int8", (96, 128))
    fast = PackedLinear.from_quant(layer, torch.float32)
    x = torch.randn(FUSED_INT8_MAX_ROWS, 128, generator=torch.Generator().manual_seed(5))
    assert _relative(fast(x), _reference(layer, x)) < 1e-4


def test_no_weight_gradient_exists() -> None:
    layer = PackedLinear.from_quant(_layer("int4", (96, 128)), torch.float32)
    assert list(layer.parameters()) == []
    x = torch.randn(4, 128, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None
    for buffer in layer.buffers():
        assert buffer.grad is None and not buffer.requires_grad


def _saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward in new storage (the module's own buffers excluded)."""
    own = {t.untyped_storage().data_ptr() for t in module.buffers()}
    own |= {t.untyped_storage().data_ptr() for t in module.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x).sum()
    return sum(seen.values())


class _DequantizeInGraph(nn.Module):
    """What plain autograd does with a dequantize-then-linear: it keeps the dense weight."""

    def __init__(self, layer: QuantLinear) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.layer.dequantized_weight(torch.float32).requires_grad_(False)
        return nn.functional.linear(x, weight * torch.ones(1, requires_grad=True))


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_nothing_is_saved_for_backward(scheme: str) -> None:
    layer = _layer(scheme, (200, 384), bias=False)
    x = torch.randn(8, 64, 384, requires_grad=True)
    fast = PackedLinear.from_quant(layer, torch.float32)
    assert _saved_bytes(fast, x) == 0
    assert _saved_bytes(layer, x) == 0  # the reference function saves only its buffers too
    # the naive formulation keeps the dense weight and the input alive until backward
    naive = _saved_bytes(_DequantizeInGraph(layer), x)
    assert naive >= 200 * 384 * 4 + x.numel() * 4


def test_packed_weights_are_smaller_than_bf16() -> None:
    for scheme, ratio in (("int8", 0.55), ("int4", 0.3)):
        packed = pack_layer(_layer(scheme, (256, 512), bias=False), torch.bfloat16)
        assert packed.nbytes() < ratio * 256 * 512 * 2, scheme


def test_planar_repacking_keeps_every_code() -> None:
    codes = torch.randint(0, 16, (7, 64), dtype=torch.uint8)
    interleaved = codes[:, 0::2] | (codes[:, 1::2] << 4)
    assert torch.equal(unpack_int4(interleaved), codes)
    assert torch.equal(unpack_planar(planar_int4(interleaved)), codes)


def test_install_kernels_swaps_every_quant_linear_and_keeps_outputs() -> None:
    model = nn.Sequential(_layer("int8", (64, 128)), nn.ReLU(), _layer("int4", (32, 64)))
    x = torch.randn(5, 128)
    with torch.no_grad():
        before = model(x)
    assert install_kernels(model, torch.float32) == 2
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    with torch.no_grad():
        assert _relative(model(x), before) < 1e-4


def test_frozen_float_linears_are_stored_in_bf16_and_trainable_ones_are_not() -> None:
    frozen, trained = nn.Linear(8, 8), nn.Linear(8, 8)
    frozen.requires_grad_(False)
    model = nn.Sequential(frozen, trained)
    assert freeze_float_linears(model, torch.bfloat16) == 1
    assert frozen.weight.dtype == torch.bfloat16 and trained.weight.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 8)).sum().backward()
    assert trained.weight.grad is not None and frozen.weight.grad is None


def test_frozen_tied_embedding_is_stored_once_in_bf16_and_the_residual_stays_fp32() -> None:
    model, reference = tiny_model("llama"), tiny_model("llama")  # tied, same seeded weights
    model.requires_grad_(False)
    model.model.layers[1].mlp.down_proj.weight.requires_grad_(True)
    x = torch.randint(0, VOCAB, (2, 9))
    freeze_float_linears(model, torch.bfloat16)
    table = model.get_input_embeddings().weight
    assert table.dtype == torch.bfloat16 and model.lm_head.weight is table  # still tied, one copy
    seen: list[torch.dtype] = []
    model.model.layers[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x).logits
        expected = reference(x).logits
    assert seen == [torch.float32]  # the residual stream starts in fp32
    assert _relative(logits.float(), expected.float()) < 2e-2  # bf16 rounding of the table only
    logits.float().sum().backward()
    assert model.model.layers[1].mlp.down_proj.weight.grad is not None
