"""Generic module surgery: find a model's linear layers and swap modules in place by name.

Used wherever a layer is rewritten (quantized, factorized, packed onto a client kernel, wrapped
with LoRA); it knows nothing of any one rewrite.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers.pytorch_utils import Conv1D


def linear_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(W [out, in], bias)`` of ``nn.Linear`` or GPT-2's ``Conv1D``; None for other layers."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # weight is [in, out]
        conv = cast("Conv1D", module)  # matched by name: no transformers import to recognise it
        return conv.weight.t(), conv.bias
    return None


def quantizable_linears(blocks: Mapping[int, nn.Module], prefix: str) -> dict[str, nn.Module]:
    """Linear-like sub-modules of ``blocks`` (by block index), named ``{prefix}.{index}.{name}``."""
    found: dict[str, nn.Module] = {}
    for index, block in blocks.items():
        for name, module in block.named_modules():
            if name and linear_weight(module) is not None:
                found[f"{prefix}.{index}.{name}"] = module
    return found


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)
