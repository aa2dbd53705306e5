"""A node's side of merge-exact aggregation: its rank, the cut of the fresh LoRA, and the round's
base weights put into the model in the form they run in (float or packed int8)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from client.kernels.linear import PackedLinear, pack_frozen_block_linears, set_frozen_linear_weight
from client.merge_exact import cut_rank, node_rank, start_round
from client.session import load_for_training
from emulator.adapter import AdapterSpec
from emulator.arch import arch_spec
from emulator.bundle import verify_bundle, write_bundle
from emulator.layers import plan_layers, renumber_state
from emulator.lora_merge import split_bases
from emulator.quant import QuantLinear, QuantScheme, quantize_weight
from tests.conftest import tiny_model


def test_a_nodes_rank_comes_from_itself_then_the_run() -> None:
    assert node_rank(None, "", 3, 8) == 8
    assert [node_rank(None, "8, 4,2", p, 8) for p in range(4)] == [8, 4, 2, 8]
    assert node_rank("2", "8,4", 0, 8) == 2  # the node's own lora-rank wins
    with pytest.raises(ValueError, match=r"outside \[1, 8\]"):
        node_rank("16", "", 0, 8)


def test_cut_rank_keeps_the_first_rows_of_a_and_columns_of_b() -> None:
    state = {
        "m.lora_A.default.weight": torch.arange(12.0).reshape(4, 3),
        "m.lora_B.default.weight": torch.arange(8.0).reshape(2, 4),
    }
    cut = cut_rank(state, 2)
    assert torch.equal(cut["m.lora_A.default.weight"], state["m.lora_A.default.weight"][:2])
    assert torch.equal(cut["m.lora_B.default.weight"], state["m.lora_B.default.weight"][:, :2])


def _packed(weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    holder = nn.Module()
    scheme = QuantScheme("int8", awq=False)
    layer = QuantLinear.from_weight(
        quantize_weight(weight, scheme), torch.ones(weight.shape[1]), bias
    )
    holder.lin = PackedLinear.from_quant(layer, torch.float32)
    return holder


def test_new_base_weights_reach_float_and_packed_linears() -> None:
    gen = torch.Generator().manual_seed(0)
    old, new = torch.randn(24, 16, generator=gen), torch.randn(24, 16, generator=gen)
    bias = torch.randn(24, generator=gen)
    x = torch.randn(5, 16, generator=gen)
    holder = _packed(old, bias)
    storage = holder.lin.codes.untyped_storage().data_ptr()
    set_frozen_linear_weight(holder, "lin", new)
    assert isinstance(holder.lin, PackedLinear)
    assert holder.lin.codes.untyped_storage().data_ptr() == storage  # rewritten in place
    error = (holder.lin(x) - (x @ new.t() + bias)).norm() / (x @ new.t() + bias).norm()
    assert error < 2e-2  # int8 per channel, as the pack of the bundle's own base
    for dtype in (torch.float32, torch.bfloat16):
        linear = nn.Linear(16, 24).to(dtype).requires_grad_(False)
        set_frozen_linear_weight(linear, "", new)
        assert linear.weight.dtype == dtype and torch.equal(linear.weight, new.to(dtype))
    with pytest.raises(ValueError, match="no frozen linear"):
        set_frozen_linear_weight(nn.Linear(16, 24), "", new)


@pytest.mark.parametrize("packed", [False, True], ids=["float", "int8-packed"])
def test_start_round_loads_the_bases_and_the_cut_lora(
    tmp_path: Path, tokenizer, packed: bool
) -> None:
    """On the client's own runtime (a lean session at rank 2 of a rank-4 run), every LoRA base
    layer then computes with the round's weight."""
    full = tiny_model("llama")
    arch = arch_spec(full.config)
    plan = plan_layers(6, 1, 1, 2)
    spec = AdapterSpec("lora", plan.adapter_layers, 4, 8, arch.lora_targets, tuple(plan.top))
    written = write_bundle(full, tokenizer, plan, spec, tmp_path / "b", source="t")
    bundle = verify_bundle(written.path)
    reference, _ = load_for_training(bundle, "fp32")
    gen = torch.Generator().manual_seed(1)
    bases = {
        k: v + 0.1 * torch.randn(v.shape, generator=gen)
        for k, v in reference.lora_base_state().items()
    }
    state = {**bases, **reference.trainable_state()}

    adapted, converted = load_for_training(bundle, "fp32", lora_rank=2)
    assert converted["lean_runtime"] == 1
    if packed:  # what an int8 emulator on a CPU with int8 dot products does to the bases
        assert pack_frozen_block_linears(adapted.model, adapted.prefix, torch.float32) > 0
    start = start_round(adapted, state, 2)
    assert all(t.shape[0] == 2 for n, t in start.items() if ".lora_A." in n)
    assert adapted.trainable_state().keys() == split_bases(state)[1].keys()
    from_full = {full_i: own for own, full_i in adapted.to_full.items()}
    own = renumber_state(bases, adapted.prefix, from_full)
    for name, weight in own.items():
        module = adapted.model.get_submodule(name.removesuffix(".weight"))
        assert isinstance(module, PackedLinear) == packed
        inputs = torch.randn(3, weight.shape[1], generator=gen)
        expected = inputs @ weight.t()
        error = (module(inputs) - expected).norm() / expected.norm()
        assert error < (2e-2 if packed else 1e-6), name


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_lora_fa_keeps_its_frozen_a_exact_through_packing_and_bf16(
    tmp_path: Path, tokenizer, precision: str
) -> None:
    """lora-fa's A is frozen but belongs to the adapter: packing the adapter blocks' frozen
    linears to int8 (an int8 emulator on a CPU with int8 dot products) or storing frozen
    linears in bf16 must leave it an fp32 parameter equal to what the coordinator sent, so
    an honest node's update of it is exactly zero (and its tensor names stay the adapter's)."""
    from client.kernels.linear import freeze_float_linears

    full = tiny_model("llama")
    arch = arch_spec(full.config)
    plan = plan_layers(6, 1, 1, 2)
    spec = AdapterSpec("lora-fa", plan.adapter_layers, 4, 8, arch.lora_targets, tuple(plan.top))
    written = write_bundle(full, tokenizer, plan, spec, tmp_path / "b", source="t")
    bundle = verify_bundle(written.path)
    adapted, _ = load_for_training(bundle, precision)
    sent = adapted.trainable_state()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    assert pack_frozen_block_linears(adapted.model, adapted.prefix, dtype) > 0
    freeze_float_linears(adapted.model, dtype)
    after = adapted.trainable_state()
    assert after.keys() == sent.keys() and any(".lora_A." in k for k in after)
    for name in sent:
        torch.testing.assert_close(after[name], sent[name], rtol=0, atol=0)
    a_factors = [p for n, p in adapted.model.named_parameters() if ".lora_A." in n]
    assert a_factors and all(p.dtype == torch.float32 for p in a_factors)
    assert not any(
        isinstance(m, PackedLinear) for n, m in adapted.model.named_modules() if ".lora_A" in n
    )
