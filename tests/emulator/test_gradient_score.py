"""The gradient-preservation score and low-rank factorization, on tiny models.

The score is exactly 0 for an identity compression (no block dropped) and grows with compression
(fewer kept blocks, lower SVD rank); a factorized linear reproduces its dense product within the
stated Frobenius bound, and equals it at full rank.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from emulator.arch import arch_spec, block_list
from emulator.batches import text_batches
from emulator.factorize import factorize_linear, rank_for_energy
from emulator.gradient_score import full_reference_gradients, score_emulator
from emulator.layers import plan_layers
from emulator.split import build_emulator
from emulator.surgery import replace_module
from tests.conftest import LABELS, tiny_model, tiny_texts


@pytest.fixture(scope="module")
def setup(tokenizer):
    model = tiny_model("llama")
    arch = arch_spec(model.config)
    texts = [t for label in LABELS for t in tiny_texts(label, 4, seed=3)]
    return model, arch, text_batches(tokenizer, texts, 32, 4)


def test_an_identity_compression_scores_zero(setup) -> None:
    model, arch, batches = setup
    plan = plan_layers(6, 1, 1, -1)
    score = score_emulator(model, build_emulator(model, plan, arch), plan, arch, batches)
    assert score.gradient_error < 1e-6 and score.loss_rise == 0.0
    assert all(b["relative_error"] == 0.0 for b in score.per_block.values())
    assert set(score.per_block) == {0, 5}
    assert all(b["cosine"] == pytest.approx(1.0) for b in score.per_block.values())


def test_the_score_grows_as_fewer_blocks_are_kept(setup) -> None:
    model, arch, batches = setup
    errors = []
    for keep in (3, 2, 1):
        plan = plan_layers(6, 1, 1, keep)
        reference = full_reference_gradients(model, plan, arch, batches)
        emulator = build_emulator(model, plan, arch)
        errors.append(score_emulator(model, emulator, plan, arch, batches, reference))
    assert 0 < errors[0].gradient_error < errors[1].gradient_error < errors[2].gradient_error
    assert all(e.per_block[0]["cosine"] < 1.0 for e in errors)
    # the full model's parameters are left as they were: no gradients, trainability unchanged
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_lower_svd_ranks_of_the_middle_raise_the_score(setup) -> None:
    model, arch, batches = setup
    plan = plan_layers(6, 1, 1, -1)
    reference = full_reference_gradients(model, plan, arch, batches)
    errors = {}
    for rank in (32, 8, 2):
        emulator = build_emulator(model, plan, arch)
        blocks = block_list(emulator, arch)
        for index in range(1, 5):  # the middle blocks
            for name, module in list(blocks[index].named_modules()):
                if isinstance(module, nn.Linear) and min(module.weight.shape) >= rank:
                    full_name = f"model.layers.{index}.{name}"
                    replace_module(emulator, full_name, factorize_linear(module, rank))
        errors[rank] = score_emulator(model, emulator, plan, arch, batches, reference)
    assert errors[32].gradient_error < 1e-6  # full rank: the dense product to rounding
    assert errors[32].gradient_error < errors[8].gradient_error < errors[2].gradient_error


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48)])
def test_a_factorized_linear_reproduces_its_dense_product_within_the_bound(
    shape: tuple[int, int],
) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(shape[1], shape[0])
    x = torch.randn(5, shape[1])
    for rank in (1, 4, min(shape) // 2, min(shape)):
        factored = factorize_linear(linear, rank)
        difference = (linear.weight - factored.weight_product).norm()
        assert difference <= factored.bound * (1 + 1e-5) + 1e-6
        # the output error is bounded by the weight error times the input norm
        with torch.no_grad():
            error = (linear(x) - factored(x)).norm(dim=-1)
        assert (error <= factored.bound * x.norm(dim=-1) * (1 + 1e-4) + 1e-5).all()
    assert factorize_linear(linear, min(shape)).bound < 1e-5
    assert rank_for_energy(linear, 1.0) <= min(shape) and rank_for_energy(linear, 0.5) >= 1
    with pytest.raises(ValueError, match="rank must be"):
        factorize_linear(linear, min(shape) + 1)
