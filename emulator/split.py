"""Split a full model into adapter blocks and an emulator (kept middle blocks), and plug back.

The emulator is an ordinary Hugging Face model of the same class with fewer blocks: its config has
the layer count (and per-layer lists such as ``layer_types``) sliced to the kept blocks, and its
state dict holds embeddings, kept blocks renumbered 0..m-1, final norm and head. Dropped middle
blocks are never copied.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from emulator.arch import ArchSpec, block_list, block_prefix, model_config
from emulator.layers import LayerPlan, renumber_state

if TYPE_CHECKING:
    from transformers import PreTrainedConfig


def emulator_config(
    full_config: PreTrainedConfig, plan: LayerPlan, arch: ArchSpec
) -> PreTrainedConfig:
    """The config of the emulator model: same family, only the planned blocks."""
    config = copy.deepcopy(full_config)
    layers = plan.emulator_layers
    for name in arch.per_layer_config:
        values = getattr(config, name, None)
        if isinstance(values, list) and len(values) == plan.num_layers:
            setattr(config, name, [values[i] for i in layers])
    config.num_hidden_layers = len(layers)
    return config


def unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without tied aliases (the first name of each storage is kept)."""
    seen: set[tuple[int, int]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = tensor
    return out


def emulator_state(
    full_model: nn.Module, plan: LayerPlan, arch: ArchSpec
) -> dict[str, torch.Tensor]:
    """Emulator tensors under emulator numbering; dropped blocks are excluded."""
    prefix = block_prefix(full_model, arch)
    return renumber_state(unique_state(full_model), prefix, plan.full_to_emulator())


def build_emulator(full_model: nn.Module, plan: LayerPlan, arch: ArchSpec) -> nn.Module:
    """An in-memory emulator: a copy of the full model holding only the planned blocks.

    The bundle path (``write_bundle`` then ``load_bundle_model``) builds the same model from the
    emulator config; tests check that both agree.
    """
    blocks = block_list(full_model, arch)
    kept = [blocks[i] for i in plan.emulator_layers]
    # Copy everything except the dropped blocks (never materialise what is not shipped).
    memo: dict[int, Any] = {id(blocks): nn.ModuleList()}
    emulator = copy.deepcopy(full_model, memo)
    # The same memo: the kept blocks refer to the copied config, not to copies of their own.
    new_blocks = nn.ModuleList([copy.deepcopy(b, memo) for b in kept])
    parent_path, _, attr = f"base_model.{arch.blocks}".rpartition(".")
    parent = emulator
    for part in parent_path.split("."):
        parent = getattr(parent, part)
    setattr(parent, attr, new_blocks)
    for index, block in enumerate(new_blocks):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = index  # type: ignore[assignment]  # an int, not a tensor or module
    # Sub-modules share the (copied) config object: update it in place so they all see it.
    sliced = emulator_config(model_config(full_model), plan, arch)
    for name in (*arch.per_layer_config, "num_hidden_layers"):
        if hasattr(sliced, name):
            setattr(model_config(emulator), name, getattr(sliced, name))
    return emulator.eval()
