"""Sparse update policies: which tensors train, and that backward stops where training stops."""

from __future__ import annotations

import pytest
import torch

from emulator.adapter import AdapterSpec, attach_adapter
from emulator.arch import REGISTRY, arch_spec, block_list
from emulator.layers import plan_layers
from emulator.split import build_emulator
from offsite.policies import POLICIES
from tests.conftest import VOCAB, tiny_model


def _adapted(model_type: str, kind: str):
    full = tiny_model(model_type)
    arch = arch_spec(full.config)
    plan = plan_layers(6, 1, 1, 2)
    emulator = build_emulator(full, plan, arch)
    spec = AdapterSpec.for_plan(kind, plan, arch, 4, 8)
    return attach_adapter(emulator, arch, spec, plan.emulator_to_full()), plan


def _trainable_blocks(adapted, prefix: str) -> dict[int, set[str]]:
    found: dict[int, set[str]] = {}
    for name, p in adapted.model.named_parameters():
        if p.requires_grad and f"{prefix}." in name:
            rest = name.split(f"{prefix}.", 1)[1]
            index, _, inner = rest.partition(".")
            found.setdefault(int(index), set()).add(inner)
    return found


@pytest.mark.parametrize("model_type", sorted(REGISTRY))
def test_each_policy_trains_what_it_says(model_type: str) -> None:
    layers: dict[str, dict[int, set[str]]] = {}
    for kind in ("full", "bias", "top", "sparse"):
        adapted, _ = _adapted(model_type, kind)
        layers[kind] = _trainable_blocks(adapted, adapted.prefix)
    bottom, top = 0, 3  # emulator indices of the adapter blocks (plan 1-2-1)
    assert set(layers["full"]) == {bottom, top}
    assert set(layers["top"]) == {top} and layers["top"][top] == layers["full"][top]
    assert set(layers["sparse"]) == {bottom, top}
    assert layers["sparse"][top] == layers["full"][top]
    assert layers["bias"][bottom] < layers["sparse"][bottom] < layers["full"][bottom]
    assert all(n.endswith("bias") or "norm" in n.lower() or "ln" in n for n in layers["bias"][top])
    lora_top, _ = _adapted(model_type, "lora-top")
    found = _trainable_blocks(lora_top, lora_top.prefix)
    assert set(found) == {top} and all("lora_" in n for n in found[top])
    arch = REGISTRY[model_type]
    projections = layers["sparse"][bottom] - layers["bias"][bottom]
    assert projections and all(
        any(f"{suffix}." in f".{n}" for suffix in arch.output_projections) for n in projections
    )


def _saved_bytes(model_type: str, kind: str) -> tuple[int, bool]:
    """Bytes autograd saves for backward, and whether any gradient reached the bottom block."""
    adapted, _ = _adapted(model_type, kind)
    blocks = adapted.model.get_base_model() if adapted.spec.policy.lora else adapted.model
    first = block_list(blocks, adapted.arch)[0]
    reached: list[bool] = []
    first.register_full_backward_hook(lambda *_: reached.append(True))
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    x = torch.randint(3, VOCAB, (4, 32))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = adapted.model(input_ids=x)
    logits = out.logits if hasattr(out, "logits") else out.last_hidden_state
    logits.float().pow(2).mean().backward()
    return sum(saved), bool(reached)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_backward_stops_at_the_lowest_trainable_tensor(model_type: str) -> None:
    top_bytes, top_reached = _saved_bytes(model_type, "top")
    lora_bytes, lora_reached = _saved_bytes(model_type, "lora")
    lora_top_bytes, lora_top_reached = _saved_bytes(model_type, "lora-top")
    assert lora_reached and not top_reached and not lora_top_reached  # nothing below is computed
    assert top_bytes < 0.6 * lora_bytes, (top_bytes, lora_bytes)
    assert lora_top_bytes < 0.6 * lora_bytes, (lora_top_bytes, lora_bytes)


def test_policy_registry_is_complete_and_unknown_kinds_fail() -> None:
    assert set(POLICIES) == {"lora", "lora-fa", "lora-top", "full", "bias", "top", "sparse"}
    with pytest.raises(ValueError, match="unknown adapter kind"):
        _adapted("llama", "everything")
