"""Channel pruning of the middle's gated MLPs: the loss cost of each channel, one fraction spread
across blocks where it costs least, and bundles whose smaller MLPs load back exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from emulator.arch import arch_spec, block_list, block_prefix
from emulator.build import public_texts
from emulator.bundle import load_bundle_model, verify_bundle
from emulator.privacy import public_text_perplexity
from emulator.prune import allocate_channels, channel_costs, prune_mlps
from offsite.config import EmulatorConfig
from tests.conftest import VOCAB, build_tiny_bundle, tiny_model, tiny_model_with_norms


def _batches() -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(3, VOCAB, (2, 2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 1, 7:] = 0  # padding is not a token the costs average over
    return [{"input_ids": i, "attention_mask": m} for i, m in zip(ids, mask, strict=True)]


def _mlps(model: torch.nn.Module, indices: tuple[int, ...]) -> dict[str, torch.nn.Module]:
    arch = arch_spec(model.config)
    prefix = block_prefix(model, arch)
    blocks = block_list(model, arch)
    return {f"{prefix}.{i}.mlp": blocks[i].get_submodule("mlp") for i in indices}


def test_a_channels_cost_is_half_the_mean_squared_taylor_term_of_the_loss() -> None:
    model = tiny_model("llama")
    mlps = _mlps(model, (2,))
    batches = _batches()
    costs = channel_costs(model, mlps, "down_proj", batches)
    # the same quantity by hand: h at the down projection's input, its loss gradient, per token
    captured: list[torch.Tensor] = []
    down = mlps["model.layers.2.mlp"].down_proj
    handle = down.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    total, tokens = torch.zeros(down.in_features, dtype=torch.float64), 0
    try:
        for batch in batches:
            captured.clear()
            logits = model(**batch).logits
            targets = batch["input_ids"][:, 1:].masked_fill(
                batch["attention_mask"][:, 1:] == 0, -100
            )
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
            )
            (grad,) = torch.autograd.grad(loss, captured[0])
            real = batch["attention_mask"].bool()
            total += (captured[0] * grad)[real].double().pow(2).sum(0)
            tokens += int(real.sum())
    finally:
        handle.remove()
    assert torch.allclose(costs["model.layers.2.mlp"], 0.5 * total / tokens, rtol=1e-4)
    assert all(p.grad is None for p in model.parameters())


def test_pruning_channels_that_carry_nothing_costs_nothing_and_keeps_the_function() -> None:
    model = tiny_model("llama")
    mlps = _mlps(model, (2, 3))
    dead = torch.arange(0, 64, 2)  # half of block 3's channels write nothing to the residual
    with torch.no_grad():
        mlps["model.layers.3.mlp"].down_proj.weight[:, dead] = 0
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    intermediate = mlps["model.layers.3.mlp"].down_proj.in_features
    fraction = len(dead) / (2 * intermediate)
    entry = prune_mlps(
        model, mlps, ("gate_proj", "up_proj", "down_proj"), _batches(), fraction, multiple=1
    )
    # the free channels go first, all from the block that does not need them
    assert entry["modules"]["model.layers.3.mlp"]["kept"] == intermediate - len(dead)
    assert entry["modules"]["model.layers.2.mlp"]["kept"] == intermediate
    assert entry["modules"]["model.layers.3.mlp"]["estimated_loss_rise"] == 0.0
    block = mlps["model.layers.3.mlp"]
    assert block.gate_proj.out_features == block.up_proj.out_features == intermediate - len(dead)
    assert block.down_proj.in_features == intermediate - len(dead)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.allclose(after, before, atol=1e-5)


def test_one_fraction_is_spread_across_mlps_by_cost_in_whole_groups() -> None:
    costs = {
        "cheap": torch.linspace(0.0, 1.0, 32),
        "dear": torch.linspace(10.0, 11.0, 32),
    }
    kept = allocate_channels(costs, 0.5, multiple=8)
    assert len(kept["dear"]) == 32 and len(kept["cheap"]) == 8  # at least one group stays
    assert kept["cheap"].tolist() == list(range(24, 32))  # the dearest of the cheap block
    uneven = allocate_channels(costs, 0.2, multiple=8)  # 12 of 64 go, all cheap: 20 -> 24 kept
    assert len(uneven["cheap"]) == 24 and len(uneven["dear"]) == 32
    assert allocate_channels(costs, 0.0, multiple=8)["cheap"].tolist() == list(range(32))
    with pytest.raises(ValueError, match="fraction"):
        allocate_channels(costs, 1.0, multiple=8)


def test_a_pruned_factorized_int8_bundle_loads_back_to_the_emulator_that_was_measured(
    tokenizer, tmp_path: Path
) -> None:
    from client.runtime.load import bundle_lean_config, load_lean_model

    settings = {
        "factorize": "fisher-svd",
        "factorize_budget": 0.3,
        "factorize_rank_multiple": 4,
        "fold_norms": True,
        "quantize": "int8",
        "max_verbatim_fraction": 0.0,
    }
    bundle, _ = build_tiny_bundle(
        tiny_model_with_norms(), tokenizer, tmp_path, -1, prune_mlp=0.5, **settings
    )
    manifest = bundle.manifest
    pruning = manifest["compression"]["pruning"]
    assert pruning["method"] == "fisher-taylor" and len(pruning["modules"]) == 4
    assert pruning["kept_channels"] <= 0.5 * pruning["channels"] + 4 * len(pruning["modules"])
    factorization = manifest["compression"]["factorization"]
    # the budget stays a share of the unpruned middle: the bundle keeps its size
    unpruned, _ = build_tiny_bundle(
        tiny_model_with_norms(), tokenizer, tmp_path / "u", -1, **settings
    )
    reference = unpruned.manifest["compression"]["factorization"]["dense_params"]
    assert factorization["rule"]["budget_params"] == int(0.3 * reference)
    assert factorization["factored_params"] <= 0.3 * reference
    assert factorization["dense_params"] < reference
    assert manifest["privacy"]["middle_tensors_verbatim"] == 0
    for name, entry in pruning["modules"].items():
        assert factorization["modules"][f"{name}.down_proj"]["in"] == entry["kept"]
    # both loaders give the emulator the build measured
    measured = manifest["privacy"]["emulator_perplexity"]
    perplexity = public_text_perplexity(tokenizer, public_texts(str(tmp_path / "public.jsonl"), 4))
    config, why = bundle_lean_config(bundle)
    assert config is not None, why
    for model in (
        load_bundle_model(verify_bundle(bundle.path)),
        load_lean_model(verify_bundle(bundle.path), config),
    ):
        for name, entry in pruning["modules"].items():
            mlp = model.get_submodule(name)
            assert mlp.gate_proj.out_features == mlp.up_proj.out_features == entry["kept"]
            assert mlp.down_proj.in_features == entry["kept"]
        assert perplexity(model) == pytest.approx(measured, rel=1e-4)


def test_pruning_is_refused_where_it_cannot_score_or_would_ship_weights_as_they_are(
    tokenizer, tmp_path: Path
) -> None:
    from offsite.errors import ConfigError

    with pytest.raises(ConfigError, match="prune_mlp alone ships"):
        EmulatorConfig(public_text="x", prune_mlp=0.5, factorize="none", quantize="none")
    with pytest.raises(ConfigError, match=r"prune_mlp must be in \[0, 1\)"):
        EmulatorConfig(public_text="x", prune_mlp=1.0)
    with pytest.raises(ConfigError, match="gated MLP"):
        build_tiny_bundle(tiny_model("gpt2"), tokenizer, tmp_path, -1, prune_mlp=0.5)
