"""The embedded default (SmolLM2-135M): bundle, verify, and exact plug-in on the real weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from offsite.catalog import model_cache_dir

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(
        not (model_cache_dir("smollm2-135m") / "config.json").is_file(),
        reason="run `make setup` (it converts the embedded model once)",
    ),
]


def test_default_split_bundle_and_exact_plug_in(tmp_path: Path) -> None:
    from coordinator.models import load_full_model
    from emulator.adapter import AdapterSpec, attach_adapter
    from emulator.arch import block_list
    from emulator.bundle import bundle_arch, load_bundle_model, verify_bundle, write_bundle
    from emulator.layers import plan_layers
    from emulator.plug import plug_adapter

    full, tokenizer, arch, _ = load_full_model("smollm2-135m")
    assert full.config.num_hidden_layers == 30 and arch.model_type == "llama"
    plan = plan_layers(30, 2, 2, 16)
    spec = AdapterSpec("lora", plan.adapter_layers, 8, 16, arch.lora_targets)
    written = write_bundle(full, tokenizer, plan, spec, tmp_path / "bundle", source="smollm2-135m")
    bundle = verify_bundle(written.path, written.digest)
    full_bytes = sum(p.numel() * 4 for p in full.parameters())
    bundle_bytes = sum(int(f["size"]) for f in bundle.manifest["files"].values())
    assert bundle_bytes < 0.8 * full_bytes  # 10 of 26 middle blocks stay home

    emulator = load_bundle_model(bundle)
    assert len(block_list(emulator, arch)) == 20
    adapted = attach_adapter(emulator, bundle_arch(bundle), spec, plan.emulator_to_full(), seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapted.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    state = adapted.trainable_state()
    assert any(".layers.29." in k for k in state)  # full-model numbering on the wire

    ids = tokenizer("Article: Shares in the bank rose sharply.\nTopic:", return_tensors="pt")
    with torch.no_grad():
        before = full(**ids).logits
        plugged = plug_adapter(full, spec, state)
        after = plugged.model(**ids).logits
        merged = plugged.model.merge_and_unload()(**ids).logits
    assert (after - before).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(merged, after, rtol=1e-4, atol=1e-4)
