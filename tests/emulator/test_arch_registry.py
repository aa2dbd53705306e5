"""Every registered architecture: split -> bundle -> emulator -> plug, on a tiny random model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from emulator.adapter import AdapterSpec, attach_adapter
from emulator.arch import REGISTRY, arch_spec, block_list
from emulator.bundle import bundle_arch, load_bundle_model, verify_bundle, write_bundle
from emulator.layers import plan_layers
from emulator.plug import plug_adapter
from emulator.split import build_emulator
from offsite.errors import ModelError
from offsite.policies import POLICIES
from tests.conftest import VOCAB, model_outputs, tiny_model

ARCHS = sorted(REGISTRY)


def _randomize_lora(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


@pytest.mark.parametrize("model_type", ARCHS)
@pytest.mark.parametrize("kind", sorted(POLICIES))
def test_plug_of_split_reproduces_full_model(
    model_type: str, kind: str, tokenizer, tmp_path: Path
) -> None:
    """No layers dropped: emulator == full, and plugging a trained adapter == emulator+adapter."""
    full = tiny_model(model_type)
    arch = arch_spec(full.config)
    plan = plan_layers(6, 1, 1, -1)
    spec = AdapterSpec.for_plan(kind, plan, arch, 4, 8)
    bundle = write_bundle(full, tokenizer, plan, spec, tmp_path / "b", source="tiny")
    bundle = verify_bundle(tmp_path / "b", bundle.digest)
    emulator = load_bundle_model(bundle)
    x = torch.randint(3, VOCAB, (2, 12))
    torch.testing.assert_close(
        model_outputs(emulator, x), model_outputs(full, x), rtol=0, atol=1e-6
    )

    adapted = attach_adapter(emulator, bundle_arch(bundle), spec, plan.emulator_to_full(), seed=1)
    _randomize_lora(adapted.model, seed=2)  # stands in for training
    state = adapted.trainable_state()
    assert state, "the adapter must have trainable tensors"
    plugged = plug_adapter(tiny_model(model_type), spec, state)
    torch.testing.assert_close(
        model_outputs(plugged.model, x), model_outputs(adapted.model, x), rtol=0, atol=1e-6
    )
    # the plug-in really changed the model (the test would pass vacuously otherwise)
    assert (model_outputs(plugged.model, x) - model_outputs(full, x)).abs().max() > 1e-4


@pytest.mark.parametrize("model_type", ARCHS)
def test_dropped_blocks_never_reach_the_bundle(model_type: str, tokenizer, tmp_path: Path) -> None:
    full = tiny_model(model_type)
    arch = arch_spec(full.config)
    plan = plan_layers(6, 1, 1, 2)  # middle 1..4 -> keep 1 and 4, drop 2 and 3
    assert plan.dropped_layers == (2, 3)
    spec = AdapterSpec("lora", plan.adapter_layers, 4, 8, arch.lora_targets)
    bundle = write_bundle(full, tokenizer, plan, spec, tmp_path / "b", source="tiny")
    emulator = load_bundle_model(verify_bundle(bundle.path, bundle.digest))
    assert len(block_list(emulator, arch)) == 4
    assert emulator.config.num_hidden_layers == 4
    # every emulator block is bit-identical to its source block; dropped blocks appear nowhere
    full_blocks, emu_blocks = block_list(full, arch), block_list(emulator, arch)
    for emu_index, full_index in enumerate(plan.emulator_layers):
        for (name, a), (_, b) in zip(
            full_blocks[full_index].state_dict().items(),
            emu_blocks[emu_index].state_dict().items(),
            strict=True,
        ):
            assert torch.equal(a, b), name
    # (constant-initialised tensors such as zero biases and unit norms are shared by every block,
    # so only tensors unique to a dropped block say anything)
    kept_bytes = {
        t.detach().numpy().tobytes()
        for i in plan.emulator_layers
        for t in full_blocks[i].parameters()
    }
    dropped = {
        t.detach().numpy().tobytes()
        for i in plan.dropped_layers
        for t in full_blocks[i].parameters()
    } - kept_bytes
    assert dropped, "random init must give the dropped blocks unique tensors"
    shipped = {t.detach().numpy().tobytes() for t in emulator.parameters()}
    assert not dropped & shipped
    # the in-memory emulator agrees with the one loaded from the bundle
    x = torch.randint(3, VOCAB, (2, 10))
    torch.testing.assert_close(
        model_outputs(build_emulator(full, plan, arch), x),
        model_outputs(emulator, x),
        rtol=0,
        atol=1e-6,
    )


def test_unknown_architecture_names_the_config_field() -> None:
    class Config:
        model_type = "mamba"

    with pytest.raises(ModelError, match="model_type"):
        arch_spec(Config())


def test_architecture_facts_the_client_uses_come_from_the_registry() -> None:
    """The lean decoder's families and the RMS norm classes the client swaps are registry data;
    every named class exists, and every gated-MLP family names the projections it has."""
    import importlib

    from client.kernels.rms_norm import LLAMA_STYLE_NORMS
    from client.runtime.decoder import lean_config

    for name, spec in REGISTRY.items():
        model = tiny_model(name)
        if spec.rms_norm:
            module, _, cls = spec.rms_norm.rpartition(".")
            assert getattr(importlib.import_module(module), cls)
            assert (module, cls) in LLAMA_STYLE_NORMS
            assert any(type(m).__name__ == cls for m in model.modules())
        if spec.gated_mlp:
            mlp = block_list(model, spec)[0].get_submodule(spec.gated_mlp)
            assert all(hasattr(mlp, p) for p in spec.gated_mlp_projections)
        config, why = lean_config(model.config.to_dict())
        assert (config is not None) == (spec.lean_decoder is not None), why
        # every normalization layer of a block, and nothing else, is named in block_norms
        norms = {
            path
            for path, module in block_list(model, spec)[0].named_modules()
            if path and type(module).__name__.endswith(("Norm", "LayerNorm"))
        }
        assert norms == set(spec.block_norms), (name, sorted(norms))


def test_a_gated_mlp_with_other_projection_names_runs_lean_and_keeps_its_keys() -> None:
    from client.kernels.lean import LeanGatedMLP

    class Mlp(torch.nn.Module):  # w1 = gate, w3 = up, w2 = down, as some families name them
        def __init__(self) -> None:
            super().__init__()
            self.w1, self.w3 = torch.nn.Linear(8, 16), torch.nn.Linear(8, 16)
            self.w2 = torch.nn.Linear(16, 8)
            self.act_fn = torch.nn.SiLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.w2(self.act_fn(self.w1(x)) * self.w3(x))

    mlp = Mlp()
    lean = LeanGatedMLP(mlp, ("w1", "w3", "w2"))
    x = torch.randn(3, 8, requires_grad=True)
    torch.testing.assert_close(lean(x), mlp(x))
    assert set(lean.state_dict()) == set(mlp.state_dict())
