"""Uniform layer drop reproduces the offsite-tuning reference selection exactly."""

from __future__ import annotations

import pytest

from emulator.layers import block_index, plan_layers, renumber_key, renumber_state, uniform_drop
from offsite.errors import ConfigError


def test_reference_vector_24_blocks_2_8_2() -> None:
    assert plan_layers(24, 2, 2, 8).middle_kept == (2, 5, 7, 10, 13, 16, 18, 21)


def test_reference_vector_48_blocks_2_16_2() -> None:
    expected = (2, 5, 8, 11, 13, 16, 19, 22, 25, 28, 31, 34, 36, 39, 42, 45)
    assert plan_layers(48, 2, 2, 16).middle_kept == expected


@pytest.mark.parametrize(("n", "k"), [(20, 8), (26, 16), (44, 16), (7, 3), (10, 10), (5, 2)])
def test_uniform_drop_matches_reference_formula(n: int, k: int) -> None:
    reference = [round(i * (n - 1) / (k - 1)) for i in range(k)]  # the paper's code
    assert uniform_drop(n, k) == reference
    assert reference[0] == 0 and reference[-1] == n - 1
    assert len(set(reference)) == k  # no duplicates: exactly k blocks kept


def test_round_half_even_is_used() -> None:
    # 3 middle blocks, keep 3 -> offsets 0, 1, 2; 5 blocks keep 3 -> 0, 2, 4; and a tie case:
    # n=6, k=5: i*5/4 = 0, 1.25, 2.5, 3.75, 5 -> round-half-even gives 2 for 2.5 (not 3).
    assert uniform_drop(6, 5) == [0, 1, 2, 4, 5]


def test_plan_properties() -> None:
    plan = plan_layers(30, 2, 2, 16)
    assert plan.label == "2-16-2"
    assert plan.adapter_layers == (0, 1, 28, 29)
    assert len(plan.emulator_layers) == 20
    assert set(plan.dropped_layers).isdisjoint(plan.emulator_layers)
    assert len(plan.dropped_layers) == 10
    assert plan.adapter_layers_in_emulator() == (0, 1, 18, 19)
    assert plan_layers(30, 2, 2, -1).dropped_layers == ()


@pytest.mark.parametrize(
    ("layers", "bottom", "top", "keep"), [(4, 2, 2, 1), (6, 1, 1, 5), (6, 1, 1, 0), (6, 3, 3, 1)]
)
def test_impossible_plans_are_config_errors(layers: int, bottom: int, top: int, keep: int) -> None:
    with pytest.raises(ConfigError, match="emulator"):
        plan_layers(layers, bottom, top, keep)


def test_renumbering() -> None:
    mapping = {0: 0, 28: 18}
    assert renumber_key("model.layers.28.mlp.weight", "model.layers", mapping) == (
        "model.layers.18.mlp.weight"
    )
    assert renumber_key("model.layers.5.mlp.weight", "model.layers", mapping) is None
    assert renumber_key("model.norm.weight", "model.layers", mapping) == "model.norm.weight"
    # a prefix must match whole dotted components: "h" is not the end of "wgh"
    assert block_index("transformer.wgh.3.x", "h") is None
    assert block_index("base_model.model.transformer.h.3.attn", "transformer.h") == 3
    state = {"model.layers.0.a": 1, "model.layers.1.a": 2, "model.embed.w": 3}
    assert renumber_state(state, "model.layers", {1: 0}) == {
        "model.layers.0.a": 2,
        "model.embed.w": 3,
    }


def test_layer_drop_keeps_a_mixed_attention_models_global_layers_first() -> None:
    from emulator.arch import REGISTRY, anchor_layers
    from emulator.layers import plan_layers

    class Gemma3Like:  # Gemma3-270m's layout: a global layer after every five sliding ones
        layer_types = ["sliding_attention"] * 5 + ["full_attention"]
        layer_types = layer_types * 3

    anchors = anchor_layers(Gemma3Like(), REGISTRY["gemma3_text"])
    assert anchors == (5, 11, 17)
    plain = plan_layers(18, 2, 2, 8)
    assert plain.middle_kept == (2, 4, 6, 8, 9, 11, 13, 15)  # the reference drop loses block 5
    anchored = plan_layers(18, 2, 2, 8, anchors)
    assert {5, 11} <= set(anchored.middle_kept) and len(anchored.middle_kept) == 8
    assert plan_layers(18, 2, 2, 1, anchors).middle_kept in ((5,), (11,))
    assert plan_layers(18, 2, 2, -1, anchors).middle_kept == tuple(range(2, 16))

    class AllGlobal:
        layer_types = ["full_attention"] * 18

    assert anchor_layers(AllGlobal(), REGISTRY["qwen2"]) == ()  # nothing to anchor
    assert plan_layers(18, 2, 2, 8, ()) == plain
