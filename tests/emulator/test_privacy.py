"""The privacy margin is measured, recorded in the manifest, and enforced by the owner's gate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from emulator.adapter import AdapterSpec
from emulator.arch import arch_spec, block_list
from emulator.build import build_bundle
from emulator.layers import plan_layers
from emulator.privacy import GateError, assess, enforce_gate, public_text_perplexity
from emulator.split import build_emulator, emulator_state
from offsite.config import EmulatorConfig
from tests.conftest import LABELS, LAYER_DROP, LAYER_DROP_OVERRIDES, tiny_model, tiny_texts


def _texts() -> list[str]:
    return [t for lab in LABELS for t in tiny_texts(lab, 4, seed=3)]


def test_verbatim_counts_follow_the_layer_plan(tokenizer) -> None:
    full = tiny_model("llama")
    # random init leaves every norm weight at 1.0 (identical across blocks, so they would
    # "ship verbatim" from dropped blocks too); trained models have distinct tensors
    with torch.no_grad():
        for p in full.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    arch = arch_spec(full.config)
    per_block = len(block_list(full, arch)[0].state_dict())
    for keep, kept_blocks in ((2, 2), (-1, 4), (1, 1)):
        plan = plan_layers(6, 1, 1, keep)
        report = assess(
            full, build_emulator(full, plan, arch), plan, arch, emulator_state(full, plan, arch)
        )
        assert report["middle_tensors"] == 4 * per_block
        assert report["middle_tensors_verbatim"] == kept_blocks * per_block
        assert report["middle_blocks_dropped"] == 4 - kept_blocks


def test_perplexity_ratio_and_gate(tokenizer) -> None:
    full = tiny_model("llama")
    arch = arch_spec(full.config)
    plan = plan_layers(6, 1, 1, 1)
    report = assess(
        full,
        build_emulator(full, plan, arch),
        plan,
        arch,
        emulator_state(full, plan, arch),
        public_text_perplexity(tokenizer, _texts()),
    )
    assert report["perplexity_ratio"] == pytest.approx(
        report["emulator_perplexity"] / report["full_perplexity"]
    )
    assert report["emulator_perplexity"] != report["full_perplexity"]
    enforce_gate(report, 0.0, 1.0)  # permissive: passes
    with pytest.raises(GateError, match="perplexity ratio"):
        enforce_gate(report, report["perplexity_ratio"] * 2, 1.0)
    with pytest.raises(GateError, match="ship verbatim"):
        enforce_gate(report, 0.0, 0.1)
    with pytest.raises(GateError, match="no perplexity ratio"):
        enforce_gate({k: v for k, v in report.items() if "perplexity" not in k}, 1.5, 1.0)


def test_bundle_records_privacy_and_refused_builds_write_nothing(
    tmp_path: Path,
    tokenizer,
) -> None:
    from offsite.data import Example, write_jsonl

    public = tmp_path / "public.jsonl"
    write_jsonl([Example("", completion=t) for t in _texts()], public)
    full = tiny_model("llama")
    arch = arch_spec(full.config)
    plan = plan_layers(6, 1, 1, 2)
    spec = AdapterSpec("lora", plan.adapter_layers, 4, 8, arch.lora_targets)
    settings = EmulatorConfig(public_text=str(public), public_examples=6, **LAYER_DROP)
    bundle = build_bundle(
        full, tokenizer, arch, plan, spec, tmp_path / "ok", source="t", settings=settings
    )
    privacy = json.loads((bundle.path / "manifest.json").read_text())["privacy"]
    assert privacy["middle_tensors_verbatim"] < privacy["middle_tensors"]
    assert privacy["perplexity_ratio"] > 0
    strict = EmulatorConfig(
        public_text=str(public),
        public_examples=6,
        max_verbatim_fraction=0.0,
        **LAYER_DROP,
    )
    with pytest.raises(GateError):
        build_bundle(
            full, tokenizer, arch, plan, spec, tmp_path / "refused", source="t", settings=strict
        )
    assert not (tmp_path / "refused").exists()


@pytest.mark.integration  # a real `offsite` process end to end
def test_cli_refusal_exit_code(tmp_path: Path, tiny_llama_dir: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "offsite.cli.main",
            "emulator",
            "build",
            "-o",
            str(tmp_path / "b"),
            f"model.name={tiny_llama_dir}",
            "emulator.bottom=1",
            "emulator.top=1",
            "emulator.keep=2",
            "emulator.public_text=''",
            *LAYER_DROP_OVERRIDES,
            "emulator.max_verbatim_fraction=0.0",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 6, result.stderr
    assert "emulator refused" in result.stderr and "Traceback" not in result.stderr
