"""client.kernels.lean: gated MLPs keep one activation fewer, with the same gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from client.kernels.lean import GatedProduct, LeanGatedMLP, lean_gated_mlps
from emulator.adapter import AdaptedModel, AdapterSpec, attach_adapter
from emulator.arch import REGISTRY, ArchSpec, arch_spec
from emulator.layers import plan_layers
from emulator.split import build_emulator
from tests.conftest import VOCAB, saved_bytes, tiny_model

GATED = sorted(name for name, spec in REGISTRY.items() if spec.gated_mlp)
ACTIVATIONS = {
    "silu": nn.functional.silu,
    "gelu_tanh": lambda x: nn.functional.gelu(x, approximate="tanh"),
    # modules take the direct backward kernels of client.kernels.lean._DERIVATIVES
    "silu-module": nn.SiLU(),
    "gelu-module": nn.GELU(),
    "gelu_tanh-module": nn.GELU(approximate="tanh"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_gated_product_gradients_are_eager_autograd_bit_for_bit(
    act: str, dtype: torch.dtype
) -> None:
    fn = ACTIVATIONS[act]
    generator = torch.Generator().manual_seed(0)
    gate, up, grad = (torch.randn(4, 16, 48, generator=generator).to(dtype) for _ in range(3))
    eager = [t.clone().requires_grad_(True) for t in (gate, up)]
    lean = [t.clone().requires_grad_(True) for t in (gate, up)]
    expected = fn(eager[0]) * eager[1]
    got = GatedProduct.apply(lean[0], lean[1], fn)
    expected.backward(grad)
    got.backward(grad)
    assert torch.equal(got, expected)
    assert torch.equal(lean[0].grad, eager[0].grad)
    assert torch.equal(lean[1].grad, eager[1].grad)


def test_gated_product_keeps_two_tensors_where_eager_keeps_three() -> None:
    gate, up = (torch.randn(8, 64, 96, requires_grad=True) for _ in range(2))
    eager, _ = saved_bytes(lambda: (nn.functional.silu(gate) * up).sum())
    lean, _ = saved_bytes(lambda: GatedProduct.apply(gate, up, nn.functional.silu).sum())
    one = gate.numel() * gate.element_size()
    assert eager == 3 * one
    assert lean == 2 * one


def _frozen_with_trainable_embedding(model_type: str) -> nn.Module:
    model = tiny_model(model_type).requires_grad_(False)
    model.get_input_embeddings().weight.requires_grad_(True)  # backward crosses every block
    return model


@pytest.mark.parametrize("model_type", GATED)
def test_lean_frozen_blocks_save_less_and_give_the_same_gradient(model_type: str) -> None:
    eager_model = _frozen_with_trainable_embedding(model_type)
    lean_model = _frozen_with_trainable_embedding(model_type)
    arch = arch_spec(lean_model.config)
    prefix = "model.layers"
    assert lean_gated_mlps(lean_model, arch, prefix) == lean_model.config.num_hidden_layers
    assert set(lean_model.state_dict()) == set(eager_model.state_dict())
    ids = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(1))

    def loss(model: nn.Module):
        return lambda: model(input_ids=ids).logits.float().square().mean()

    eager_bytes, eager_loss = saved_bytes(loss(eager_model))
    lean_bytes, lean_loss = saved_bytes(loss(lean_model))
    eager_loss.backward()
    lean_loss.backward()
    config = lean_model.config
    activation = 3 * 24 * config.intermediate_size * 4  # one fp32 act(gate) per block
    assert eager_bytes - lean_bytes == config.num_hidden_layers * activation
    assert torch.equal(lean_loss, eager_loss)
    assert torch.equal(
        lean_model.get_input_embeddings().weight.grad,
        eager_model.get_input_embeddings().weight.grad,
    )


def _adapted(policy: str) -> tuple[AdaptedModel, ArchSpec]:
    full = tiny_model("llama")
    arch = arch_spec(full.config)
    plan = plan_layers(6, 1, 1, 2)
    emulator = build_emulator(full, plan, arch)
    spec = AdapterSpec.for_plan(policy, plan, arch, 4, 8)
    return attach_adapter(emulator, arch, spec, plan.emulator_to_full()), arch


@pytest.mark.parametrize("policy", ["lora", "sparse", "full"])
def test_mlps_with_trainable_tensors_go_lean_with_the_same_gradients(policy: str) -> None:
    eager, arch = _adapted(policy)
    lean, _ = _adapted(policy)
    mlps = [name for name, _ in lean.model.named_modules() if name.endswith(".mlp")]
    trainable = [
        name
        for name in mlps
        if any(p.requires_grad for p in lean.model.get_submodule(name).parameters())
    ]
    assert trainable  # every policy here trains some MLP tensor in an adapter block
    assert lean_gated_mlps(lean.model, arch, lean.prefix) == len(mlps)
    assert all(isinstance(lean.model.get_submodule(name), LeanGatedMLP) for name in mlps)
    assert set(lean.model.state_dict()) == set(eager.model.state_dict())
    ids = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(2))

    def loss(adapted: AdaptedModel):
        return lambda: adapted.model(input_ids=ids).logits.float().square().mean()

    eager_bytes, eager_loss = saved_bytes(loss(eager))
    lean_bytes, lean_loss = saved_bytes(loss(lean))
    eager_loss.backward()
    lean_loss.backward()
    # the tiny emulator's blocks before the lowest trainable one run without autograd
    reached = (
        1
        + max(int(name.split(".")[-2]) for name in mlps)
        - min(int(name.split(".")[-2]) for name in trainable)
    )
    activation = 3 * 24 * lean.model.config.intermediate_size * 4  # fp32 act(gate)
    assert eager_bytes - lean_bytes == reached * activation
    assert torch.equal(lean_loss, eager_loss)
    grads = {n: p.grad for n, p in eager.model.named_parameters() if p.requires_grad}
    assert grads
    for name, param in lean.model.named_parameters():
        if param.requires_grad:
            assert torch.equal(param.grad, grads[name]), name


def test_architectures_without_a_gated_mlp_are_left_alone() -> None:
    model = tiny_model("gpt2")
    assert lean_gated_mlps(model, arch_spec(model.config), "transformer.h") == 0


@pytest.mark.parametrize("name", ["gelu_pytorch_tanh", "gelu", "silu", "gelu_new", "quick_gelu"])
def test_transformers_activations_take_a_direct_kernel_or_recompute_with_eager_bits(
    name: str,
) -> None:
    """transformers' own activation modules (Gemma3's gelu_pytorch_tanh among them): the ones
    calling F.gelu / F.silu take the direct backward kernel, the rest recompute; both give eager
    autograd's gradient bit for bit, also when an outer saved-tensor hook routes every tensor."""
    from transformers.activations import ACT2FN

    from client.kernels import arena as arena_module
    from client.kernels.arena import ActivationArena
    from client.kernels.lean import derivative

    act = ACT2FN[name]
    direct = name in {"gelu_pytorch_tanh", "gelu", "silu"}
    assert (derivative(act) is not None) == direct
    generator = torch.Generator().manual_seed(5)
    gate, up, grad = (torch.randn(2, 8, 32, generator=generator) for _ in range(3))
    eager = [t.clone().requires_grad_(True) for t in (gate, up)]
    (act(eager[0]) * eager[1]).backward(grad)
    routed = [t.clone().requires_grad_(True) for t in (gate, up)]
    arena = ActivationArena(routed)
    old, arena_module.MIN_BYTES = arena_module.MIN_BYTES, 0
    try:
        with arena.step():
            GatedProduct.apply(routed[0], routed[1], act).backward(grad)
    finally:
        arena_module.MIN_BYTES = old
    assert torch.equal(routed[0].grad, eager[0].grad)
    assert torch.equal(routed[1].grad, eager[1].grad)
