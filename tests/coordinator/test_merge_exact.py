"""Merge-exact LoRA aggregation: the mean of the clients' ΔW = alpha/r·B·A folded into the adapter
blocks' base weights, checked against that mean computed centrally on a tiny model (1e-6), for
equal and for heterogeneous ranks, over two rounds."""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch

from client.merge_exact import cut_rank
from coordinator.federation.aggregation import ClientUpdate
from coordinator.federation.merge_exact import MergeExact
from coordinator.federation.secure_rounds import apply_mean_update
from emulator.adapter import AdapterSpec, attach_adapter, merged_model
from emulator.arch import arch_spec
from emulator.layers import plan_layers
from emulator.lora_merge import LORA_A, base_name, lora_modules, split_bases
from emulator.plug import plug_adapter
from emulator.split import build_emulator
from offsite.federation.robust import AggregationRule
from tests.conftest import VOCAB, tiny_model

RANK, ALPHA, SEED = 4, 8, 7
EXAMPLES = [10, 30, 60]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """A tiny model gains nothing from a second thread, and on a busy machine OpenMP's
    barriers made each of its steps 100x slower (4 s instead of 30 ms, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _setup() -> tuple[torch.nn.Module, AdapterSpec, dict[str, torch.Tensor]]:
    """The emulator of a tiny Llama, the run's adapter spec, and the round-1 merge-exact
    adapter (base weights + seeded LoRA); built once, never changed by callers."""
    full = tiny_model("llama")
    arch = arch_spec(full.config)
    plan = plan_layers(6, 1, 1, 2)
    spec = AdapterSpec.for_plan("lora", plan, arch, RANK, ALPHA)
    emulator = build_emulator(full, plan, arch)
    start = attach_adapter(copy.deepcopy(emulator), arch, spec, plan.emulator_to_full(), seed=SEED)
    return emulator, spec, {**start.lora_base_state(), **start.trainable_state()}


def _train(
    emulator: torch.nn.Module,
    spec: AdapterSpec,
    global_state: dict[str, torch.Tensor],
    ranks: list[int],
) -> list[dict[str, torch.Tensor]]:
    """Each client's LoRA factors after real SGD steps on its own tokens, at its own rank, on
    top of the round's base weights."""
    arch = arch_spec(emulator.config)
    plan = plan_layers(6, 1, 1, 2)
    bases, lora = split_bases(global_state)
    out = []
    for client, rank in enumerate(ranks):
        mine = replace(spec, lora_r=rank)
        adapted = attach_adapter(copy.deepcopy(emulator), arch, mine, plan.emulator_to_full())
        adapted.load_trainable({**bases, **cut_rank(lora, rank)})
        optimizer = torch.optim.SGD(adapted.trainable_parameters(), lr=0.5)
        tokens = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(client))
        for _ in range(2):
            optimizer.zero_grad()
            adapted.model(input_ids=tokens).logits.float().pow(2).mean().backward()
            optimizer.step()
        out.append(adapted.trainable_state())
    return out


@functools.cache
def _first_round(ranks: tuple[int, ...]) -> list[dict[str, torch.Tensor]]:
    """The clients' factors after the first round at ``ranks`` (trained once per session)."""
    emulator, spec, state = _setup()
    return _train(emulator, spec, state, list(ranks))


def _central(
    global_state: dict[str, torch.Tensor], states: list[dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Base + Σ_i w_i · alpha/r_i · B_i·A_i per module, computed here in float64."""
    share = [n / sum(EXAMPLES) for n in EXAMPLES]
    out = {}
    for a_name in lora_modules(global_state):
        b_name = a_name.replace(".lora_A.", ".lora_B.")
        mean = sum(
            w * (ALPHA / s[a_name].shape[0]) * (s[b_name].double() @ s[a_name].double())
            for w, s in zip(share, states, strict=True)
        )
        out[base_name(a_name)] = global_state[base_name(a_name)].double() + mean
    return out


def _merge(
    global_state: dict[str, torch.Tensor], states: list[dict[str, torch.Tensor]], round_: int
) -> dict[str, torch.Tensor]:
    updates = [
        ClientUpdate(f"node-{i}", s, n)
        for i, (s, n) in enumerate(zip(states, EXAMPLES, strict=True))
    ]
    result = MergeExact(ALPHA, seed=0).aggregate(global_state, updates, AggregationRule(), round_)
    assert result.accepted == ["node-0", "node-1", "node-2"] and not result.quarantined
    return result.state


@pytest.mark.parametrize("ranks", [[RANK] * 3, [4, 2, 1]], ids=["equal", "heterogeneous"])
def test_merge_exact_is_the_central_mean_of_the_clients_products(ranks: list[int]) -> None:
    emulator, spec, state = _setup()
    for round_ in (1, 2):  # the second round trains on the first round's merged base
        states = _first_round(tuple(ranks)) if round_ == 1 else _train(emulator, spec, state, ranks)
        expected = _central(state, states)
        merged = _merge(state, states, round_)
        assert merged.keys() == state.keys()
        for name, value in expected.items():
            torch.testing.assert_close(merged[name].double(), value, rtol=0, atol=1e-6)
            assert not torch.equal(merged[name], state[name])  # the base moved
        lora = split_bases(merged)[1]
        # the next round starts from a fresh LoRA at the run's rank: B zero, A re-drawn
        for a_name in lora_modules(lora):
            assert lora[a_name].shape == state[a_name].shape
            assert not torch.equal(lora[a_name], state[a_name])
            assert not lora[a_name.replace(".lora_A.", ".lora_B.")].any()
        state = merged

    # the plugged-in full model computes with exactly those base weights
    full = tiny_model("llama")
    plugged = merged_model(plug_adapter(full, spec, state)).state_dict()
    for name, value in split_bases(state)[0].items():
        weight = name.split("base_model.model.", 1)[-1].replace(".base_layer", "")
        torch.testing.assert_close(plugged[weight], value, rtol=0, atol=0)


def test_fresh_lora_is_shared_by_the_round_and_seeded() -> None:
    _, _, state = _setup()
    merge = MergeExact(ALPHA, seed=3)
    bases, lora = split_bases(state)
    one, again = merge.next_adapter(bases, lora, 4), merge.next_adapter(bases, lora, 4)
    other = merge.next_adapter(bases, lora, 5)
    a_name = lora_modules(lora)[0]
    assert torch.equal(one[a_name], again[a_name]) and not torch.equal(one[a_name], other[a_name])
    # PEFT's Kaiming-uniform(a=√5) bound 1/√in
    assert one[a_name].abs().max() <= 1 / lora[a_name].shape[1] ** 0.5


def test_naive_averaging_would_have_erred_on_the_same_clients() -> None:
    """The round records naive averaging's error for the same factors (equal ranks only)."""
    _, _, state = _setup()
    states = _first_round((RANK,) * 3)
    updates = [
        ClientUpdate(f"n{i}", s, n) for i, (s, n) in enumerate(zip(states, EXAMPLES, strict=True))
    ]
    result = MergeExact(ALPHA, 0).aggregate(state, updates, AggregationRule(), 1)
    assert result.lora_product_error is not None and result.lora_product_error > 1e-6
    mixed = _first_round((4, 2, 1))
    updates = [
        ClientUpdate(f"n{i}", s, n) for i, (s, n) in enumerate(zip(mixed, EXAMPLES, strict=True))
    ]
    assert (
        MergeExact(ALPHA, 0).aggregate(state, updates, AggregationRule(), 1).lora_product_error
        is None
    )


def test_bad_factors_are_quarantined_not_merged() -> None:
    _, _, state = _setup()
    good = _first_round((RANK,) * 3)[0]
    a_name = lora_modules(good)[0]
    too_big = dict(good)
    too_big[a_name] = torch.zeros(RANK + 1, good[a_name].shape[1])
    nan = {**good, a_name: torch.full_like(good[a_name], float("nan"))}
    missing = {k: v for k, v in good.items() if k != a_name}
    updates = [
        ClientUpdate("good", good, 5),
        ClientUpdate("big", too_big, 5),
        ClientUpdate("nan", nan, 5),
        ClientUpdate("missing", missing, 5),
    ]
    result = MergeExact(ALPHA, 0).aggregate(state, updates, AggregationRule(), 1)
    assert result.accepted == ["good"]
    assert set(result.quarantined) == {"big", "nan", "missing"}
    assert "rank <=" in result.quarantined["big"] and "non-finite" in result.quarantined["nan"]
    with pytest.raises(ValueError, match="no usable client update"):
        MergeExact(ALPHA, 0).aggregate(state, updates[1:], AggregationRule(), 1)


def test_robust_rules_and_norm_bounding_apply_to_delta_w() -> None:
    """The rule sees each client's ΔW: a bound on the update norm bounds ‖ΔW‖."""
    _, _, state = _setup()
    states = _first_round((RANK,) * 3)
    updates = [ClientUpdate(f"n{i}", s, 1) for i, s in enumerate(states)]
    bound = 1e-3
    rule = AggregationRule(max_update_norm=bound)
    result = MergeExact(ALPHA, 0).aggregate(state, updates, rule, 1)
    assert sorted(result.clipped) == ["n0", "n1", "n2"]
    change = sum(
        float((result.state[n].double() - state[n].double()).pow(2).sum())
        for n in split_bases(state)[0]
    )
    assert change**0.5 <= bound * (1 + 1e-5)
    trimmed = MergeExact(ALPHA, 0).aggregate(state, updates, AggregationRule("trimmed-mean"), 1)
    assert trimmed.accepted == ["n0", "n1", "n2"]


def test_secure_sum_of_dense_delta_w_gives_the_same_merge() -> None:
    """Under secure aggregation clients mask their dense ΔW in the base weights' order; the
    unmasked mean folded in equals the plain merge."""
    from client.merge_exact import deltas as client_deltas

    emulator, spec, state = _setup()
    states = _first_round((4, 2, 1))
    arch = arch_spec(emulator.config)
    plan = plan_layers(6, 1, 1, 2)
    adapted = attach_adapter(copy.deepcopy(emulator), arch, spec, plan.emulator_to_full())
    _, lora = split_bases(state)
    merge = MergeExact(ALPHA, 0)
    template = merge.secure_template(state)
    total = None
    for s, n in zip(states, EXAMPLES, strict=True):
        start = cut_rank(lora, s[lora_modules(s)[0]].shape[0])
        delta = client_deltas(adapted, s, start)
        assert sorted(delta) == sorted(template)
        flat = torch.cat([delta[k].double().reshape(-1) * n for k in sorted(delta)])
        total = flat if total is None else total + flat
    assert total is not None
    bases = apply_mean_update(template, (total / sum(EXAMPLES)).numpy())
    secure = merge.after_secure(bases, state, 1)
    plain = _merge(state, states, 1)
    assert secure.keys() == plain.keys()
    for name in secure:
        torch.testing.assert_close(secure[name], plain[name], rtol=0, atol=1e-6)


def test_dp_noise_lands_on_the_base_weights_only() -> None:
    _, _, state = _setup()
    noisy = MergeExact.add_noise(state, 0.5)
    bases, lora = split_bases(state)
    assert all(not torch.equal(noisy[n], bases[n]) for n in bases)
    assert all(torch.equal(noisy[n], lora[n]) for n in lora)


def test_client_clips_delta_w_by_scaling_b() -> None:
    from client.merge_exact import clip_factors
    from client.merge_exact import deltas as client_deltas

    emulator, spec, state = _setup()
    trained = _first_round((RANK,) * 3)[0]
    arch = arch_spec(emulator.config)
    plan = plan_layers(6, 1, 1, 2)
    adapted = attach_adapter(copy.deepcopy(emulator), arch, spec, plan.emulator_to_full())
    _, lora = split_bases(state)

    def norm(s: dict[str, torch.Tensor]) -> float:
        return (
            sum(float(d.double().pow(2).sum()) for d in client_deltas(adapted, s, lora).values())
            ** 0.5
        )

    before = norm(trained)
    clipped = clip_factors(adapted, trained, lora, before / 4)
    assert norm(clipped) == pytest.approx(before / 4, rel=1e-5)
    assert all(torch.equal(clipped[n], trained[n]) for n in trained if n.endswith(LORA_A))
    unclipped = clip_factors(adapted, trained, lora, before * 2)
    assert all(torch.equal(unclipped[n], trained[n]) for n in trained)


def _module_states(
    ranks: list[int],
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """A one-module merge-exact adapter (rank 4) and clients' factors at ``ranks``."""
    gen = torch.Generator().manual_seed(2)
    stem = "base_model.model.m.q"
    start = {
        f"{stem}.base_layer.weight": torch.randn(48, 40, generator=gen),
        f"{stem}.lora_A.default.weight": torch.randn(4, 40, generator=gen),
        f"{stem}.lora_B.default.weight": torch.zeros(48, 4),
    }
    clients = [
        {
            f"{stem}.lora_A.default.weight": start[f"{stem}.lora_A.default.weight"][:r]
            + 0.1 * torch.randn(r, 40, generator=gen),
            f"{stem}.lora_B.default.weight": 0.1 * torch.randn(48, r, generator=gen),
        }
        for r in ranks
    ]
    return start, clients


def test_strategy_merges_through_flower_messages_and_noises_delta_w_only() -> None:
    """``AdapterFedAvg(merge=…)`` on real Flower replies: the exact weighted mean of ΔW without
    DP; under DP the base weights carry noise of the calibrated size and the fresh LoRA none."""
    from flwr.app import ArrayRecord

    from coordinator.federation.strategy import AdapterFedAvg, RoundSettings
    from offsite.federation.dp import DpSchedule, epsilon
    from tests.coordinator.test_strategy import _reply

    start, clients = _module_states([4, 1, 2])
    examples = [10, 30, 60]
    base, a_name = next(iter(start)), lora_modules(start)[0]
    expected = start[base].double() + sum(
        n
        / 100
        * (ALPHA / c[a_name].shape[0])
        * (c[a_name.replace("_A.", "_B.")].double() @ c[a_name].double())
        for c, n in zip(clients, examples, strict=True)
    )

    def run(
        rule: AggregationRule | None = None, dp: DpSchedule | None = None
    ) -> tuple[dict[str, torch.Tensor], AdapterFedAvg]:
        settings = RoundSettings(dp=dp, merge=MergeExact(ALPHA, 0))
        strategy = AdapterFedAvg(lambda _r, _rep: None, rule, settings)
        strategy._global = ArrayRecord(start)
        replies = [_reply(i, c, n) for i, (c, n) in enumerate(zip(clients, examples, strict=True))]
        arrays, _ = strategy.aggregate_train(1, replies)
        assert arrays is not None
        return arrays.to_torch_state_dict(), strategy

    plain, strategy = run()
    torch.testing.assert_close(plain[base].double(), expected, rtol=0, atol=1e-6)
    assert strategy.round_log[-1]["outcome"] == "aggregated 3 updates"
    sigma, clip = 2.0, 0.5
    dp = DpSchedule(sigma, 1.0, 2, 1e-5, epsilon(sigma, 1.0, 2, 1e-5), clip)
    noisy, _ = run(dp=dp, rule=AggregationRule())
    unweighted = (
        start[base].double()
        + sum(
            (ALPHA / c[a_name].shape[0])
            * (c[a_name.replace("_A.", "_B.")].double() @ c[a_name].double())
            for c in clients
        )
        / 3
    )
    noise = noisy[base].double() - unweighted
    assert float(noise.std()) == pytest.approx(sigma * clip / 3, rel=0.1)
    for name in lora_modules(noisy):
        assert torch.equal(noisy[name], plain[name])  # the same fresh A, no noise
        assert not noisy[name.replace("_A.", "_B.")].any()


@pytest.mark.parametrize(
    "rule",
    [AggregationRule(), AggregationRule(max_update_norm=0.5, max_examples=20)],
    ids=["fedavg", "fedavg-bounded"],
)
def test_streamed_fedavg_equals_the_rule_on_dense_delta_w(rule: AggregationRule) -> None:
    """FedAvg streams module by module without holding any client's dense ΔW; it gives what
    ``aggregate`` gives on the dense ΔW (the path robust rules take)."""
    from coordinator.federation.aggregation import aggregate
    from emulator.lora_merge import lora_deltas

    start, clients = _module_states([4, 1, 2])
    updates = [
        ClientUpdate(f"n{i}", c, n) for i, (c, n) in enumerate(zip(clients, EXAMPLES, strict=True))
    ]
    streamed = MergeExact(ALPHA, 0).aggregate(start, updates, rule, 1)
    bases, lora = split_bases(start)
    dense = [
        ClientUpdate(u.node, lora_deltas(u.state, ALPHA, lora), u.num_examples) for u in updates
    ]
    zero = {n: torch.zeros_like(b, dtype=torch.float64) for n, b in bases.items()}
    reference = aggregate(zero, dense, rule)
    assert streamed.clipped == reference.clipped and streamed.accepted == reference.accepted
    if rule.max_update_norm:
        assert streamed.clipped  # the bound bit
    for name, base in bases.items():
        expected = (base.double() + reference.state[name]).float()
        torch.testing.assert_close(streamed.state[name], expected, rtol=0, atol=1e-6)


def test_transfer_bytes_per_mode() -> None:
    """Merge-exact downloads the base weights too; its upload is the factors, or under secure
    aggregation the masked dense ΔW at 8 bytes a value."""
    from coordinator.federation.merge_exact import round_transfer_bytes

    start, _ = _module_states([4])
    lora = split_bases(start)[1]
    lora_bytes = 4 * (4 * 40 + 48 * 4)
    assert round_transfer_bytes(lora, secure=False) == {
        "download_bytes": lora_bytes,
        "upload_bytes": lora_bytes,
    }
    assert round_transfer_bytes(start, secure=False) == {
        "download_bytes": lora_bytes + 4 * 48 * 40,
        "upload_bytes": lora_bytes,
    }
    assert round_transfer_bytes(start, secure=True)["upload_bytes"] == 8 * (48 * 40 + 1)


def test_merge_exact_on_conv1d_weights_folds_the_transposed_product() -> None:
    """GPT-2 keeps its linears as Conv1D (in × out): ΔW lands transposed, and the plugged
    model computes with base + mean ΔW (one round, ranks 4 and 2, centrally checked)."""
    full = tiny_model("gpt2")
    arch = arch_spec(full.config)
    assert arch.lora_fan_in_fan_out
    plan = plan_layers(6, 1, 1, 2)
    spec = AdapterSpec.for_plan("lora", plan, arch, RANK, ALPHA)
    emulator = build_emulator(full, plan, arch)
    start = attach_adapter(copy.deepcopy(emulator), arch, spec, plan.emulator_to_full(), seed=1)
    state = {**start.lora_base_state(), **start.trainable_state()}
    bases, lora = split_bases(state)
    gen = torch.Generator().manual_seed(4)
    clients = []
    for rank in (4, 2):
        cut = cut_rank(lora, rank)
        clients.append(
            {
                k: v + 0.1 * torch.randn(v.shape, generator=gen) if ".lora_B." in k else v
                for k, v in cut.items()
            }
        )
    updates = [
        ClientUpdate(f"n{i}", c, n) for i, (c, n) in enumerate(zip(clients, [1, 3], strict=True))
    ]
    merged = MergeExact(ALPHA, 0, fan_in_fan_out=True).aggregate(
        state, updates, AggregationRule(), 1
    )
    plugged = merged_model(plug_adapter(tiny_model("gpt2"), spec, merged.state)).state_dict()
    for a_name in lora_modules(lora):
        b_name = a_name.replace(".lora_A.", ".lora_B.")
        mean = sum(
            w * (ALPHA / c[a_name].shape[0]) * (c[b_name].double() @ c[a_name].double())
            for w, c in zip([0.25, 0.75], clients, strict=True)
        )
        expected = bases[base_name(a_name)].double() + mean.t()
        weight = base_name(a_name).split("base_model.model.", 1)[-1].replace(".base_layer", "")
        torch.testing.assert_close(plugged[weight].double(), expected, rtol=0, atol=1e-6)
