"""client.kernels.arena: saved activations in one reused buffer, same gradients bit for bit."""

from __future__ import annotations

import pytest
import torch

from client.kernels import arena as arena_module
from client.kernels.arena import ActivationArena
from emulator.adapter import AdapterSpec, attach_adapter
from emulator.arch import REGISTRY, arch_spec
from emulator.forward import autocast
from emulator.layers import plan_layers
from tests.conftest import VOCAB, saved_bytes, tiny_model


def _adapted(policy: str):
    model = tiny_model("llama")
    arch = arch_spec(model.config)
    plan = plan_layers(6, 1, 1, 4)
    spec = AdapterSpec.for_plan(policy, plan, arch)
    return attach_adapter(model, arch, spec, {i: i for i in range(6)})


def _loss(model: torch.nn.Module, ids: torch.Tensor, precision: str) -> torch.Tensor:
    with autocast(precision, torch.device("cpu")):
        logits = model(input_ids=ids).logits
    return logits.float().logsumexp(-1).mean()


def _assert_same_gradients(
    plain: torch.nn.Module, routed: torch.nn.Module, ids: torch.Tensor, precision: str, steps: int
) -> None:
    """Train-step both models ``steps`` times, ``routed`` inside an arena (reused from the
    second step on); every gradient must be the same bits, and the arena must have been used."""
    arena = ActivationArena([*routed.parameters(), *routed.buffers()])
    for _ in range(steps):
        _loss(plain, ids, precision).backward()
        with arena.step():
            _loss(routed, ids, precision).backward()
        for (name, a), b in zip(plain.named_parameters(), routed.parameters(), strict=True):
            if a.requires_grad:
                assert torch.equal(a.grad, b.grad), name
                a.grad = b.grad = None
    assert arena.peak_bytes > 0


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("policy", ["lora", "sparse", "full"])
def test_gradients_are_the_same_bits_with_the_arena(
    policy: str, precision: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(arena_module, "MIN_BYTES", 0)  # tiny model: route every tensor
    ids = torch.randint(3, VOCAB, (4, 24), generator=torch.Generator().manual_seed(0))
    plain, routed = _adapted(policy), _adapted(policy)
    _assert_same_gradients(plain.model, routed.model, ids, precision, steps=3)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activation_checkpointing_inside_the_arena_gives_the_same_gradients(
    precision: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checkpointed blocks recompute under their own saved-tensor hooks (the innermost win);
    what is saved outside them goes to the buffer."""
    from client.session import enable_checkpointing

    monkeypatch.setattr(arena_module, "MIN_BYTES", 0)
    ids = torch.randint(3, VOCAB, (4, 24), generator=torch.Generator().manual_seed(3))
    plain, routed = _adapted("lora"), _adapted("lora")
    for adapted in (plain, routed):
        enable_checkpointing(adapted.model)
        adapted.model.train()
    _assert_same_gradients(plain.model, routed.model, ids, precision, steps=2)


def test_saved_activations_land_in_the_buffer_and_parameters_stay_put(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(arena_module, "MIN_BYTES", 0)
    adapted = _adapted("lora")
    params = [*adapted.model.parameters(), *adapted.model.buffers()]
    arena = ActivationArena(params)
    ids = torch.randint(3, VOCAB, (4, 24), generator=torch.Generator().manual_seed(1))
    kept_in_place = {p.untyped_storage().data_ptr() for p in params}

    total, _ = saved_bytes(lambda: _loss(adapted.model, ids, "fp32"))
    in_place = 0

    def count(t: torch.Tensor) -> torch.Tensor:
        nonlocal in_place
        if t.untyped_storage().data_ptr() in kept_in_place:
            in_place += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
        _loss(adapted.model, ids, "fp32")
    with arena.step():
        loss = _loss(adapted.model, ids, "fp32")
        loss.backward()
    # what is not a parameter or buffer went into the buffer (in 64-byte slices), except
    # strided views, which stay where they are (measured here: 95 % of the bytes routed)
    activations = total - in_place
    assert 0.9 * activations <= arena.peak_bytes <= activations + 64 * 200
    for p in params:
        assert arena._pack(p) is p


def test_the_buffer_is_reused_and_grows_once_for_a_longer_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(arena_module, "MIN_BYTES", 0)
    monkeypatch.setattr(arena_module, "_CHUNK", 4096)  # force several chunks in the first step
    adapted = _adapted("lora")
    arena = ActivationArena([*adapted.model.parameters(), *adapted.model.buffers()])
    generator = torch.Generator().manual_seed(2)
    capacities = []
    for length in (16, 16, 16, 40, 40, 16):
        ids = torch.randint(3, VOCAB, (4, length), generator=generator)
        with arena.step():
            _loss(adapted.model, ids, "fp32").backward()
        capacities.append(arena.capacity)
        assert len(arena._chunks) == 1  # one buffer after every step
    assert capacities[0] == capacities[1] == capacities[2] < capacities[3]
    assert capacities[3] == capacities[4] == capacities[5] == arena.peak_bytes


CAUSAL = sorted(name for name, spec in REGISTRY.items() if spec.causal_lm)


@pytest.mark.parametrize("model_type", CAUSAL)
def test_every_family_trains_inside_the_arena_with_the_clients_lean_mlps(
    model_type: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a client runs — LoRA, lean gated MLPs, the buffer — on every registry family, with
    every saved tensor routed. Gemma3's ``gelu_pytorch_tanh`` once crashed here: its activation's
    recompute in backward saved a tensor the buffer held, and the buffer copied it into itself."""
    from client.kernels.lean import lean_gated_mlps

    monkeypatch.setattr(arena_module, "MIN_BYTES", 0)
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(4))
    models = []
    for _ in range(2):
        model = tiny_model(model_type)
        arch = arch_spec(model.config)
        plan = plan_layers(6, 1, 1, 4)
        adapted = attach_adapter(
            model, arch, AdapterSpec.for_plan("lora", plan, arch), {i: i for i in range(6)}
        )
        lean_gated_mlps(adapted.model, adapted.arch, adapted.prefix)
        models.append(adapted.model)
    _assert_same_gradients(models[0], models[1], ids, "bf16", steps=2)


def test_a_tensor_already_in_the_buffer_is_not_copied_into_it_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(arena_module, "MIN_BYTES", 0)
    arena = ActivationArena()
    with arena.step():
        inside = arena._pack(torch.randn(64, 64))
        assert arena._pack(inside) is inside
        x = inside.detach().requires_grad_(True)  # what a backward-time recompute sees
        (x * x).sum().backward()  # saves x: autograd refuses a pack hook that writes into it
    assert torch.equal(x.grad, 2 * inside)
