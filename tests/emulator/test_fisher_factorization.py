"""Loss-weighted (K-FAC) SVD and one parameter budget across all matrices: the rank of each
middle linear chosen by what its truncation is estimated to cost the LM loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from emulator.arch import REGISTRY, arch_spec, block_list, block_prefix
from emulator.factorize import (
    allocate_ranks,
    break_even_rank,
    decompose,
    low_rank_from,
    rank_cap,
    whitening,
)
from emulator.fisher import output_gradient_moments
from emulator.surgery import quantizable_linears
from tests.conftest import (
    VOCAB,
    build_tiny_bundle,
    tiny_model,
    tiny_model_with_norms,
)


def test_output_gradient_moments_are_the_mean_outer_product_of_the_loss_gradient() -> None:
    model = tiny_model("llama")
    name = "model.layers.2.mlp.down_proj"
    linear = model.get_submodule(name)
    ids = torch.randint(3, VOCAB, (2, 9))
    attention = torch.ones_like(ids)
    attention[1, 6:] = 0  # right padding: not a token of the average
    moments = output_gradient_moments(
        model, {name: linear}, [{"input_ids": ids, "attention_mask": attention}]
    )
    # the same by hand: the output kept in the graph, the summed next-token loss, its gradient
    kept: list[torch.Tensor] = []
    handle = linear.register_forward_hook(lambda _m, _a, out: kept.append(out))
    for p in model.parameters():
        p.requires_grad_(True)
    logits = model(input_ids=ids, attention_mask=attention).logits
    handle.remove()
    targets = ids[:, 1:].masked_fill(attention[:, 1:] == 0, -100)
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
    )
    (grad,) = torch.autograd.grad(loss, kept[0])
    rows = grad[attention.bool()].double()
    expected = rows.T @ rows / int(attention.sum())
    torch.testing.assert_close(moments[name], expected, rtol=1e-4, atol=1e-9)
    assert float(moments[name].diagonal().sum()) > 0


def test_collecting_gradient_moments_leaves_the_parameters_as_they_were() -> None:
    model = tiny_model("llama")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    arch = arch_spec(model.config)
    linears = quantizable_linears({1: block_list(model, arch)[1]}, block_prefix(model, arch))
    moments = output_gradient_moments(
        model, linears, [{"input_ids": torch.randint(3, VOCAB, (2, 8))}]
    )
    assert set(moments) == set(linears) and all(m.shape[0] == m.shape[1] for m in moments.values())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def _spd(size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(size, size, generator=generator) * torch.logspace(1, -2, size)[None, :]
    return (mix @ mix.T / size).double()


def test_the_loss_weighted_truncation_is_best_in_its_metric_and_reports_its_cost() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 40, bias=False)
    inputs, outputs = whitening(_spd(48, 1)), whitening(_spd(40, 2))

    def loss_cost(low: torch.nn.Module) -> float:  # ½‖Gᵀ(W − W')S‖², the K-FAC loss rise
        delta = (linear.weight - low.weight_product).detach().double()
        return 0.5 * float((outputs.T @ delta @ inputs).pow(2).sum())

    fisher = decompose(linear, inputs, outputs)
    weighted = low_rank_from(linear, fisher, 8)
    input_only = low_rank_from(linear, decompose(linear, inputs), 8)
    plain = low_rank_from(linear, decompose(linear), 8)
    assert loss_cost(weighted) < loss_cost(input_only) and loss_cost(weighted) < loss_cost(plain)
    assert fisher.discarded(8) == pytest.approx(loss_cost(weighted), rel=1e-6)
    # the bound stays the weight error of the product
    error = float((linear.weight - weighted.weight_product).detach().norm())
    assert weighted.bound == pytest.approx(error, rel=1e-4)


def test_one_budget_goes_where_the_spectrum_is_largest_and_stays_within_each_cap() -> None:
    steep = torch.linspace(10, 0.1, 40).double()  # a matrix whose truncation costs much
    flat = torch.full((40,), 0.5).double()
    spectra = {"steep": (steep, 40, 48), "flat": (flat, 40, 48)}
    budget = 24 * (40 + 48)  # 24 ranks between the two
    ranks = allocate_ranks(spectra, budget, 4, 1.0)
    assert sum(r * (40 + 48) for r in ranks.values()) <= budget
    assert ranks["steep"] > ranks["flat"] >= 4  # every matrix keeps at least one group
    assert all(r % 4 == 0 for r in ranks.values())
    # with room for everything, each matrix stops at its cap, below break-even
    everything = allocate_ranks(spectra, 10**9, 4, 0.5)
    cap = rank_cap(40, 48, 0.5, 4)
    assert everything == {"steep": cap, "flat": cap} and cap <= break_even_rank(48, 40) // 2


def test_a_fisher_svd_bundle_keeps_its_budget_and_ships_no_middle_tensor_verbatim(
    tokenizer, tmp_path: Path
) -> None:
    bundle, _ = build_tiny_bundle(
        tiny_model_with_norms(),
        tokenizer,
        tmp_path,
        -1,
        factorize="fisher-svd",
        factorize_budget=0.3,
        factorize_max_rank_fraction=1.0,
        factorize_rank_multiple=4,
        fold_norms=True,
        quantize="int8",
        max_verbatim_fraction=0.0,
    )
    factorization = bundle.manifest["compression"]["factorization"]
    assert factorization["method"] == "fisher-svd"
    assert factorization["rule"]["budget"] == 0.3
    assert factorization["factored_params"] <= 0.3 * factorization["dense_params"]
    ranks = {entry["rank"] for entry in factorization["modules"].values()}
    assert len(ranks) > 1  # the budget is spread by cost, not evenly
    costs = [entry["estimated_loss_rise"] for entry in factorization["modules"].values()]
    assert all(c >= 0 for c in costs)
    assert factorization["estimated_loss_rise"] == pytest.approx(sum(costs))
    assert bundle.manifest["privacy"]["middle_tensors_verbatim"] == 0


@pytest.mark.parametrize("model_type", sorted(n for n, s in REGISTRY.items() if not s.causal_lm))
def test_fisher_svd_without_a_language_modelling_head_spreads_the_budget_by_energy(
    model_type: str, tokenizer, tmp_path: Path
) -> None:
    bundle, _ = build_tiny_bundle(
        tiny_model(model_type),
        tokenizer,
        tmp_path,
        3,
        factorize="fisher-svd",
        factorize_budget=0.3,
        factorize_rank_multiple=4,
    )
    factorization = bundle.manifest["compression"]["factorization"]
    assert factorization["method"] == "whitened-svd" and factorization["rule"]["budget"] == 0.3
    assert factorization["factored_params"] <= 0.3 * factorization["dense_params"]
    assert "estimated_loss_rise" not in factorization
