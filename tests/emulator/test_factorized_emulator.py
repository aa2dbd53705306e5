"""SVD-factorized emulators: every kept middle linear ships as two smaller factors, never as the
owner's matrix; the bundle loads back to the emulator that was built (float and int8 factors)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from emulator.adapter import AdapterSpec
from emulator.arch import REGISTRY, arch_spec, block_list, block_prefix
from emulator.build import build_bundle, factorize_emulator
from emulator.bundle import load_bundle_model, verify_bundle
from emulator.digest import tensor_sha256
from emulator.factorize import (
    LowRankLinear,
    break_even_rank,
    choose_rank,
    install_factorized_layers,
)
from emulator.layers import plan_layers
from emulator.quant import QuantLinear
from emulator.split import build_emulator
from emulator.surgery import linear_weight, quantizable_linears
from offsite.config import EmulatorConfig
from tests.conftest import (
    VOCAB,
    model_outputs,
    tiny_model,
    tiny_model_with_norms,
    write_public_text,
)


def _settings(tmp_path: Path, causal: bool, **changes: object) -> EmulatorConfig:
    return EmulatorConfig(
        public_text=str(write_public_text(tmp_path)) if causal else "",
        public_examples=4,
        calibration_examples=8,
        quant_group_size=16,
        factorize="svd",
        factorize_rank_multiple=4,
        factorize_max_rank_fraction=0.5,
        **{"fold_norms": False, **changes},
    )


@pytest.mark.parametrize("model_type", sorted(REGISTRY))
@pytest.mark.parametrize("scheme", ["none", "int8"])
def test_a_factorized_bundle_ships_no_middle_matrix_and_loads_what_was_built(
    model_type: str, scheme: str, tokenizer, tmp_path: Path
) -> None:
    full = tiny_model(model_type)
    arch = arch_spec(full.config)
    plan = plan_layers(6, 1, 1, 3)
    spec = AdapterSpec("lora", plan.adapter_layers, 4, 8, arch.lora_targets)
    settings = _settings(tmp_path, arch.causal_lm, quantize=scheme)
    bundle = build_bundle(
        full, tokenizer, arch, plan, spec, tmp_path / "b", source="tiny", settings=settings
    )
    bundle = verify_bundle(bundle.path, bundle.digest)
    factorization = bundle.manifest["compression"]["factorization"]
    modules = factorization["modules"]
    tensors = bundle.manifest["tensors"]
    # every kept middle linear is factorized, below half its break-even rank, and no dense weight
    expected = set(
        quantizable_linears(_middle(build_emulator(full, plan, arch), arch, plan), _p(full, arch))
    )
    assert set(modules) == expected and modules
    for name, entry in modules.items():
        assert f"{name}.weight" not in tensors and f"{name}.qweight" not in tensors
        assert 1 <= entry["rank"] <= break_even_rank(entry["in"], entry["out"]) // 2
        assert 0 < entry["relative_error"] < 1
    assert factorization["factored_params"] < factorization["dense_params"]
    from emulator.build import describe_compression

    assert "middle linears SVD-factorized" in describe_compression(bundle.manifest)
    # no original middle matrix is among the shipped tensors
    shipped = {tensor_sha256(t) for t in _shipped(bundle).values()}
    for index in plan.middle_kept:
        for module in block_list(full, arch)[index].modules():
            found = linear_weight(module)
            if found is not None:
                assert tensor_sha256(found[0].contiguous()) not in shipped

    emulator = load_bundle_model(bundle)
    low_rank = [m for m in emulator.modules() if isinstance(m, LowRankLinear)]
    assert len(low_rank) == len(modules)
    if scheme == "int8":
        assert all(
            isinstance(m.down, QuantLinear) and isinstance(m.up, QuantLinear) for m in low_rank
        )
    for index in plan.adapter_layers_in_emulator():  # adapter blocks stay as they are
        assert not any(
            isinstance(m, LowRankLinear) for m in block_list(emulator, arch)[index].modules()
        )

    x = torch.randint(3, VOCAB, (2, 12))
    rebuilt = build_emulator(full, plan, arch)
    factorize_emulator(rebuilt, plan, arch, settings)
    dense = model_outputs(build_emulator(full, plan, arch), x)
    loaded, expected_out = model_outputs(emulator, x), model_outputs(rebuilt, x)
    if scheme == "none":  # the bundle holds exactly the factors that were computed
        torch.testing.assert_close(loaded, expected_out, rtol=1e-5, atol=1e-5)
    else:
        assert float((loaded - expected_out).norm() / expected_out.norm()) < 0.05
    assert float((expected_out - dense).norm()) > 0  # it really is a compression


def _middle(model, arch, plan):
    blocks = block_list(model, arch)
    first = len(plan.bottom)
    return {i: blocks[i] for i in range(first, first + len(plan.middle_kept))}


def _p(model, arch):
    return block_prefix(model, arch)


def _shipped(bundle) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for name in ("adapter.safetensors", "emulator.safetensors"):
        out.update(load_file(str(bundle.path / name)))
    return out


def test_distilling_a_factorized_emulator_ships_no_middle_tensor_at_all(
    tokenizer, tmp_path: Path
) -> None:
    """Factors alone leave norms (and biases) verbatim; distillation trains them all, so a
    verbatim gate of 0 passes."""
    full = tiny_model_with_norms()
    arch = arch_spec(full.config)
    plan = plan_layers(6, 1, 1, 3)
    spec = AdapterSpec("lora", plan.adapter_layers, 4, 8, arch.lora_targets)
    only = build_bundle(
        full,
        tokenizer,
        arch,
        plan,
        spec,
        tmp_path / "f",
        source="tiny",
        settings=_settings(tmp_path, True),
    )
    privacy = only.manifest["privacy"]
    norms_per_block = sum(1 for n, _ in block_list(full, arch)[0].named_parameters() if "norm" in n)
    assert privacy["middle_tensors_verbatim"] == norms_per_block * len(plan.middle_kept)
    distilled = build_bundle(
        full,
        tokenizer,
        arch,
        plan,
        spec,
        tmp_path / "d",
        source="tiny",
        settings=_settings(
            tmp_path,
            True,
            distill=True,
            distill_steps=2,
            distill_texts=8,
            max_verbatim_fraction=0.0,
        ),
    )
    assert distilled.manifest["privacy"]["middle_tensors_verbatim"] == 0


def test_ranks_keep_the_energy_stay_below_break_even_and_never_reproduce_the_matrix() -> None:
    torch.manual_seed(0)
    low = torch.randn(96, 4) @ torch.randn(4, 64)  # rank 4
    linear = torch.nn.Linear(64, 96, bias=False)
    with torch.no_grad():
        linear.weight.copy_(low + 1e-4 * torch.randn(96, 64))
    assert choose_rank(linear, 0.99, 1.0, 1) == 4  # the energy rank
    assert choose_rank(linear, 0.99, 1.0, 8) == 8  # rounded up to the multiple
    with torch.no_grad():
        linear.weight.copy_(torch.randn(96, 64))
    cap = int(0.5 * break_even_rank(64, 96))  # 19
    assert choose_rank(linear, 1.0, 0.5, 8) == 16  # capped, and kept a multiple of 8
    assert choose_rank(linear, 1.0, 0.5, 1) == cap
    # the cap is below in·out/(in+out) < min(in, out): never a rank that gives W back exactly
    for shape in ((4, 4), (2, 64), (64, 3), (576, 1536)):
        dense = torch.nn.Linear(shape[1], shape[0])
        assert choose_rank(dense, 1.0, 1.0, 4) <= break_even_rank(shape[1], shape[0]) < min(shape)


def test_factors_that_do_not_fit_the_model_are_refused() -> None:
    model = tiny_model("llama")
    name = "model.layers.2.mlp.down_proj"
    out_features, in_features = model.get_submodule(name).weight.shape

    def entry(shape: list[int]) -> dict[str, object]:
        return {"shape": shape, "dtype": "F32"}

    good = {
        f"{name}.down.weight": entry([4, in_features]),
        f"{name}.up.weight": entry([out_features, 4]),
    }
    install_factorized_layers(tiny_model("llama"), {name: {"rank": 4}}, good)
    for broken, message in (
        ({f"{name}.down.weight": good[f"{name}.down.weight"]}, "lacks its down/up"),
        ({**good, f"{name}.weight": entry([out_features, in_features])}, "dense weight"),
        ({**good, f"{name}.down.weight": entry([3, in_features])}, "rank 4"),
    ):
        with pytest.raises(ValueError, match=message):
            install_factorized_layers(tiny_model("llama"), {name: {"rank": 4}}, broken)
    with pytest.raises(ValueError, match="not a linear"):
        install_factorized_layers(tiny_model("llama"), {"model.layers.2.mlp": {"rank": 4}}, good)
