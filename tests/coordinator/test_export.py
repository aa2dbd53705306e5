"""`offsite export`: merged checkpoint and PEFT adapter load with plain transformers/peft."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from coordinator.serve.export import export_run
from coordinator.state.adapters import save_adapter
from emulator.adapter import AdapterSpec, attach_adapter
from emulator.arch import arch_spec
from emulator.bundle import load_bundle_model, write_bundle
from emulator.layers import plan_layers
from offsite.config import load_config
from offsite.errors import DataError
from tests.conftest import VOCAB, tiny_model

MERGE = ["federation.lora_aggregation='merge-exact'"]


def _fake_run(
    tmp_path: Path, model_dir: Path, tokenizer, kind: str, overrides: list[str] | None = None
) -> Path:
    """A run folder as `offsite simulate` leaves it, with a trained-looking adapter."""
    run = tmp_path / "run"
    config = load_config(
        None, [f"model.name='{model_dir}'", f"train.adapter='{kind}'", *(overrides or [])]
    )
    run.mkdir()
    (run / "config.toml").write_text(config.to_toml())
    full = tiny_model("llama")
    arch = arch_spec(full.config)
    plan = plan_layers(6, 1, 1, 2)
    spec = AdapterSpec(kind, plan.adapter_layers, 4, 8, arch.lora_targets, tuple(plan.top))
    bundle = write_bundle(full, tokenizer, plan, spec, run / "bundle", source=str(model_dir))
    adapted = attach_adapter(load_bundle_model(bundle), arch, spec, plan.emulator_to_full(), seed=0)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in adapted.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    save_adapter(adapted.trainable_state(), run / "adapters" / "round-2.safetensors")
    (run / "metrics.json").write_text(
        json.dumps(
            {
                "scores": {
                    k: {"metric": "accuracy", "value": v}
                    for k, v in {
                        "full_zero_shot": 0.4,
                        "emulator_zero_shot": 0.3,
                        "emulator_fine_tuned": 0.5,
                        "plug_in": 0.6,
                    }.items()
                },
                "run": {"data": "toy", "labels": ["a", "b"], "num_clients": 2, "rounds": 2},
                "config": {"federation": {"rounds": 2}},
            }
        )
    )
    return run


@pytest.mark.parametrize(
    ("kind", "layers"), [("lora", [0, 5]), ("lora-top", [5]), ("lora-fa", [0, 5])]
)
def test_lora_export_peft_and_merged_agree(
    tmp_path: Path, tiny_llama_dir: Path, tokenizer, kind: str, layers: list[int]
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = _fake_run(tmp_path, tiny_llama_dir, tokenizer, kind)
    result = export_run(run)
    assert result.out_dir == run / "export" / "round-2"
    assert result.peft is not None
    config = json.loads((result.peft / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == layers  # full-model blocks the policy trains only
    assert config["peft_type"] == "LORA"

    x = torch.randint(3, VOCAB, (2, 10))
    merged = AutoModelForCausalLM.from_pretrained(result.merged).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with_peft = PeftModel.from_pretrained(base, result.peft).eval()
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    with torch.no_grad():
        a, b, c = merged(x).logits, with_peft(x).logits, plain(x).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert (a - c).abs().max() > 1e-3  # the adapter is really in there
    assert "offsite" not in (result.merged / "config.json").read_text()
    card = result.card.read_text()
    assert "plug-in" in card and "PeftModel.from_pretrained" in card


def test_full_adapter_export_has_no_peft(tmp_path: Path, tiny_llama_dir: Path, tokenizer) -> None:
    run = _fake_run(tmp_path, tiny_llama_dir, tokenizer, "full")
    result = export_run(run, 2, tmp_path / "out")
    assert result.peft is None and (result.merged / "model.safetensors").is_file()


def test_export_errors_are_actionable(tmp_path: Path, tiny_llama_dir: Path, tokenizer) -> None:
    with pytest.raises(DataError, match="not a run folder"):
        export_run(tmp_path)
    run = _fake_run(tmp_path, tiny_llama_dir, tokenizer, "lora")
    with pytest.raises(DataError, match="--round"):
        export_run(run, 7)
    shutil.rmtree(run / "adapters")
    (run / "adapters").mkdir()
    with pytest.raises(DataError, match="no trained adapter"):
        export_run(run)


def test_merge_exact_export_matches_the_plugged_model(
    tmp_path: Path, tiny_llama_dir: Path, tokenizer
) -> None:
    """A merge-exact adapter moved the adapter blocks' base weights (here by a sum of rank-2
    changes, as three rounds of rank-2 clients would) and carries a LoRA: the merged
    checkpoint and the SVD-refactorized PEFT adapter both give the plugged model's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from emulator.lora_merge import split_bases
    from emulator.plug import plug_adapter

    run = _fake_run(tmp_path, tiny_llama_dir, tokenizer, "lora", MERGE)
    path = run / "adapters" / "round-2.safetensors"
    lora = load_file(str(path))
    full = tiny_model("llama")
    spec = AdapterSpec("lora", (0, 5), 4, 8, arch_spec(full.config).lora_targets, (5,))
    bases = plug_adapter(full, spec, lora).lora_base_state()
    gen = torch.Generator().manual_seed(3)
    for name, weight in bases.items():
        for _ in range(3):
            b = torch.randn(weight.shape[0], 2, generator=gen) * 0.05
            a = torch.randn(2, weight.shape[1], generator=gen) * 0.05
            bases[name] = weight + b @ a
            weight = bases[name]
    state = {**bases, **lora}
    save_adapter(state, path)

    result = export_run(run)
    assert result.peft is not None
    refactorized = json.loads((result.peft / "refactorized.json").read_text())
    assert refactorized["rank"] <= 3 * 2 + 4 and refactorized["max_relative_error"] < 1e-5
    assert f"rank-{refactorized['rank']} LoRA" in result.card.read_text()

    x = torch.randint(3, VOCAB, (2, 10))
    plugged = plug_adapter(tiny_model("llama"), spec, state).model.eval()
    merged = AutoModelForCausalLM.from_pretrained(result.merged).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with_peft = PeftModel.from_pretrained(base, result.peft).eval()
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    with torch.no_grad():
        ref, a, b, c = plugged(x).logits, merged(x).logits, with_peft(x).logits, plain(x).logits
    torch.testing.assert_close(a, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(b, ref, rtol=0, atol=1e-5)
    assert (ref - c).abs().max() > 1e-3  # the moved base weights are really in there
    assert split_bases(state)[0]
