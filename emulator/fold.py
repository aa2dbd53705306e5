"""Fold a block's pre-norm weights into the linears that read the norm's output.

A pre-norm block computes ``W·(g ⊙ n(x))`` with ``n`` the (weightless) RMS normalisation and
``g`` the norm's weight; that equals ``(W·diag g)·n(x)``. Folding moves ``g`` into every consumer
``W`` and leaves the norm with unit scale: the block computes the same function (up to float
rounding), and the owner's norm weights no longer ship as themselves. A compressed emulator then
changes (factorizes, quantizes) the folded linears, so none of the block's tensors ships
verbatim. Which norms fold into which linears is architecture data (``ArchSpec.foldable_norms``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from emulator.arch import ArchSpec


@torch.no_grad()
def fold_norms(blocks: Iterable[nn.Module], arch: ArchSpec) -> int:
    """Fold ``arch.foldable_norms`` of every block in place; how many norms were folded."""
    folded = 0
    for block in blocks:
        for norm_name, consumers in arch.foldable_norms:
            weight = block.get_submodule(norm_name).weight
            if not isinstance(weight, torch.Tensor):
                raise TypeError(f"{norm_name} has no weight tensor to fold")
            scale = weight.detach().double() + arch.norm_weight_offset
            for name in consumers:
                linear = block.get_submodule(name)
                if not isinstance(linear, nn.Linear):
                    raise TypeError(f"{name} is {type(linear).__name__}, not a linear layer")
                linear.weight.copy_((linear.weight.double() * scale[None, :]).to(linear.weight))
            weight.fill_(1.0 - arch.norm_weight_offset)
            folded += 1
    return folded
