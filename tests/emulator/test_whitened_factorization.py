"""Activation-aware (whitened) SVD and norm folding: the pieces of a depth-preserving emulator
that ships no middle tensor of the owner's as it is."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from emulator.arch import REGISTRY, arch_spec, block_list
from emulator.factorize import factorize_linear, whitening
from emulator.fold import fold_norms
from tests.conftest import (
    VOCAB,
    build_tiny_bundle,
    model_outputs,
    tiny_model,
    tiny_model_with_norms,
)

FOLDABLE = sorted(name for name, spec in REGISTRY.items() if spec.foldable_norms)


@pytest.mark.parametrize("model_type", FOLDABLE)
def test_folding_norms_keeps_the_function_and_leaves_unit_norms(model_type: str) -> None:
    model = tiny_model(model_type)
    arch = arch_spec(model.config)
    with torch.no_grad():  # a random init's norms are all ones: make them matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    x = torch.randint(3, VOCAB, (2, 10))
    before = model_outputs(model, x)
    blocks = list(block_list(model, arch))
    assert fold_norms(blocks[1:-1], arch) == len(arch.foldable_norms) * (len(blocks) - 2)
    torch.testing.assert_close(model_outputs(model, x), before, rtol=1e-4, atol=1e-4)
    for block in blocks[1:-1]:
        for norm_name, _ in arch.foldable_norms:
            scale = block.get_submodule(norm_name).weight + arch.norm_weight_offset
            torch.testing.assert_close(scale, torch.ones_like(scale))


def test_whitened_svd_is_best_on_the_inputs_it_was_calibrated_on() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 40, bias=True)
    # inputs with a few strong directions, as a block's activations have
    mix = torch.randn(48, 48) * torch.logspace(1, -2, 48)[None, :]
    x = torch.randn(4096, 48) @ mix.T
    moment = x.T @ x / len(x)
    plain = factorize_linear(linear, 8)
    whitened = factorize_linear(linear, 8, whitening(moment))

    def output_error(low: torch.nn.Module) -> float:
        with torch.no_grad():
            return float((low(x) - linear(x)).norm() / linear(x).norm())

    assert output_error(whitened) < 0.5 * output_error(plain)
    # the stated bound is the weight error of the product, for both rules
    for low in (plain, whitened):
        error = float((linear.weight - low.weight_product).detach().norm())
        assert low.bound == pytest.approx(error, rel=1e-4)
    # plain SVD is the best for the weight itself (Eckart–Young)
    assert plain.bound <= whitened.bound


def test_a_folded_whitened_int8_emulator_ships_no_middle_tensor_verbatim(
    tokenizer, tmp_path: Path
) -> None:
    full = tiny_model_with_norms()
    settings = {
        "factorize": "whitened-svd",
        "factorize_rank_multiple": 4,
        "fold_norms": True,
        "quantize": "int8",
        "max_verbatim_fraction": 0.0,
    }
    bundle, plan = build_tiny_bundle(full, tokenizer, tmp_path / "b", -1, **settings)
    compression = bundle.manifest["compression"]
    assert compression["factorization"]["method"] == "whitened-svd"
    assert compression["factorization"]["calibration_texts"] == 8
    assert compression["folded_norms"] == 2 * len(plan.middle_kept)
    assert bundle.manifest["privacy"]["middle_tensors_verbatim"] == 0
    # without folding the norms ship as they are, and the same gate refuses the build
    from emulator.privacy import GateError

    with pytest.raises(GateError, match="ship verbatim"):
        build_tiny_bundle(full, tokenizer, tmp_path / "c", -1, **{**settings, "fold_norms": False})
