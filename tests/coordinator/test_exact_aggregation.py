"""Exact adapter aggregation: with LoRA's A frozen (``lora-fa``), FedAvg of the clients' B is the
mean of their updates B·A, checked against that mean computed centrally on a tiny model."""

from __future__ import annotations

import copy

import torch

from coordinator.federation.aggregation import ClientUpdate, aggregate, lora_product_error
from emulator.adapter import AdapterSpec, attach_adapter, merged_model
from emulator.arch import arch_spec
from emulator.layers import plan_layers
from emulator.plug import plug_adapter
from emulator.split import build_emulator
from offsite.federation.robust import AggregationRule
from tests.conftest import VOCAB, tiny_model

CLIENTS = 3


def _client_states(kind: str) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """The seeded initial adapter and each client's adapter after real training steps on its
    own random tokens, on an emulator of a tiny Llama."""
    full = tiny_model("llama")
    arch = arch_spec(full.config)
    plan = plan_layers(6, 1, 1, 2)
    spec = AdapterSpec.for_plan(kind, plan, arch, 4, 8)
    emulator = build_emulator(full, plan, arch)
    start = attach_adapter(copy.deepcopy(emulator), arch, spec, plan.emulator_to_full(), seed=7)
    initial = start.trainable_state()
    states = []
    for client in range(CLIENTS):
        adapted = attach_adapter(copy.deepcopy(emulator), arch, spec, plan.emulator_to_full())
        adapted.load_trainable(initial)
        optimizer = torch.optim.SGD(adapted.trainable_parameters(), lr=0.5)
        tokens = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(client))
        for _ in range(3):
            optimizer.zero_grad()
            adapted.model(input_ids=tokens).logits.float().pow(2).mean().backward()
            optimizer.step()
        states.append(adapted.trainable_state())
    return initial, states


def test_frozen_a_trains_only_b_and_keeps_a_in_the_adapter() -> None:
    initial, states = _client_states("lora-fa")
    a_names = [n for n in initial if ".lora_A." in n]
    b_names = [n for n in initial if ".lora_B." in n]
    assert a_names and len(a_names) == len(b_names) and set(initial) == set(a_names + b_names)
    for state in states:
        assert all(torch.equal(state[n], initial[n]) for n in a_names)  # A never moves
        assert any(not torch.equal(state[n], initial[n]) for n in b_names)  # B trained


def test_fedavg_of_frozen_a_lora_is_the_mean_of_the_clients_updates() -> None:
    initial, states = _client_states("lora-fa")
    examples = [10, 30, 60]
    updates = [
        ClientUpdate(f"node-{i}", s, n)
        for i, (s, n) in enumerate(zip(states, examples, strict=True))
    ]
    result = aggregate(initial, updates, AggregationRule())
    assert result.lora_product_error is not None and result.lora_product_error < 1e-12

    # the plugged-in full model's merged weights vs W + scale · Σ_i w_i B_i·A_i, computed here
    full = tiny_model("llama")
    arch = arch_spec(full.config)
    plan = plan_layers(6, 1, 1, 2)
    spec = AdapterSpec.for_plan("lora-fa", plan, arch, 4, 8)
    base = {k: v.clone() for k, v in full.state_dict().items()}
    merged = merged_model(plug_adapter(full, spec, result.state)).state_dict()
    share = [n / sum(examples) for n in examples]
    scale = spec.lora_alpha / spec.lora_r
    checked = 0
    for a_name in (n for n in initial if ".lora_A." in n):
        b_name = a_name.replace(".lora_A.", ".lora_B.")
        mean_update = sum(
            w * (s[b_name].double() @ s[a_name].double())
            for w, s in zip(share, states, strict=True)
        )
        weight = a_name.split("base_model.model.", 1)[-1].replace(".lora_A.default", "")
        expected = base[weight].double() + scale * mean_update
        torch.testing.assert_close(merged[weight].double(), expected, rtol=0, atol=1e-6)
        checked += 1
    assert checked == len([n for n in initial if ".lora_A." in n]) > 0


def test_plain_lora_averaging_is_not_exact_on_the_same_clients() -> None:
    """The control: with A trained too, the same protocol leaves a measurable error."""
    _, states = _client_states("lora")
    error = lora_product_error(states, [10, 30, 60])
    assert error is not None and error > 1e-6


def test_large_adapters_estimate_the_averaging_error_from_a_sketch() -> None:
    """Above the dense-size cap the error comes from a random projection: close to the exact
    value (relative std ≈ 9 % per squared norm), at out × 256 memory per module."""
    from coordinator.federation.aggregation import SKETCH_COLUMNS, LoraProducts

    generator = torch.Generator().manual_seed(0)
    states = [
        {
            "m0.lora_A.weight": torch.randn(8, 600, generator=generator),
            "m0.lora_B.weight": torch.randn(500, 8, generator=generator),
        }
        for _client in range(5)
    ]
    weights = [1.0, 2.0, 3.0, 1.0, 5.0]
    exact, sketched = LoraProducts(), LoraProducts(exact_elements=0)
    for state, weight in zip(states, weights, strict=True):
        exact.add(state, weight)
        sketched.add(state, weight)
    assert exact.estimated is False and sketched.estimated is True
    assert sketched._ba["m0.lora_A.weight"].shape == (500, SKETCH_COLUMNS)
    truth, estimate = exact.error(), sketched.error()
    assert truth is not None and estimate is not None and truth > 0.1
    assert abs(estimate - truth) / truth < 0.15
