"""Adapter tensors on the coordinator: the seeded initial adapter, and safe save/load."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from emulator.adapter import attach_adapter
from emulator.bundle import Bundle, bundle_arch, load_bundle_model


def initial_adapter_state(
    bundle: Bundle, seed: int, lora_bases: bool = False
) -> dict[str, torch.Tensor]:
    """The round-0 adapter: LoRA A seeded, B zero (so round 0 equals the untouched emulator);
    with ``lora_bases`` (merge-exact aggregation) also the LoRA modules' base weights."""
    model = load_bundle_model(bundle)
    adapted = attach_adapter(
        model, bundle_arch(bundle), bundle.adapter, bundle.plan.emulator_to_full(), seed=seed
    )
    state = adapted.trainable_state()
    return {**adapted.lora_base_state(), **state} if lora_bases else state


def save_adapter(state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Write atomically (temp file, fsync, rename): a crash leaves the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tensors = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in state.items()}
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    with tmp.open("rb") as handle:
        os.fsync(handle.fileno())
    tmp.replace(path)


def load_adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))
