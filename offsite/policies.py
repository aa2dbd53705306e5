"""The client's update policies, in one table: which tensors of the adapter blocks train, and
the default learning rate of each (``train.lr = 0``).

Learning rates: lora, lora-fa and lora-top 2e-3 (measured best for r=8 on the default, lora-fa
not tuned separately), bias 1e-3;
full, top and sparse 1e-4, since they move pretrained weights. ``emulator.adapter`` applies a
policy to a model; ``offsite.config`` validates ``train.adapter`` against ``PolicyName``.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal, TypeAlias

PolicyName: TypeAlias = Literal["lora", "lora-fa", "lora-top", "full", "bias", "top", "sparse"]


@dataclass(frozen=True)
class UpdatePolicy:
    """Which tensors of the adapter blocks train (the client's sparse-update policy)."""

    name: str
    help: str
    lora: bool = False  # LoRA factors (PEFT) instead of the blocks' own tensors
    # LoRA's A stays as the seeded initial adapter set it and only B trains (FFA-LoRA): every
    # client shares A, so FedAvg of B is the exact mean of the updates B·A
    frozen_lora_a: bool = False
    top_only: bool = False  # only the top adapter blocks train
    bottom: str = "all"  # in bottom blocks: "all" | "small" (biases, norms) | "outputs" | "none"
    top: str = "all"  # in top blocks, same vocabulary
    lr: float = 1e-4  # default AdamW learning rate (train.lr = 0)

    def frozen(self, name: str) -> bool:
        """Whether the adapter tensor ``name`` never trains (LoRA's A under lora-fa): it is
        the same seeded tensor for every client and carries no data, so DP noise skips it."""
        return self.frozen_lora_a and ".lora_A." in name


POLICIES: dict[str, UpdatePolicy] = {  # the one table: names, what trains, default lr
    p.name: p
    for p in (
        UpdatePolicy(
            "lora", "LoRA on the registry's target linears of every adapter block", True, lr=2e-3
        ),
        UpdatePolicy(
            "lora-fa",
            "LoRA with A frozen at its seeded start and only B trained (FFA-LoRA): federated "
            "averaging of B is exact, and a sparse upload sends half of LoRA's tensors",
            lora=True,
            frozen_lora_a=True,
            lr=2e-3,
        ),
        UpdatePolicy(
            "lora-top",
            "LoRA on the registry's target linears of the top adapter blocks only; backward "
            "never enters the emulator",
            lora=True,
            top_only=True,
            bottom="none",
            lr=2e-3,
        ),
        UpdatePolicy("full", "every tensor of every adapter block"),
        UpdatePolicy(
            "bias",
            "biases and norm weights of the adapter blocks",
            bottom="small",
            top="small",
            lr=1e-3,
        ),
        UpdatePolicy(
            "top",
            "every tensor of the top adapter blocks; backward never enters the emulator",
            top_only=True,
            bottom="none",
        ),
        UpdatePolicy(
            "sparse",
            "top blocks fully; in bottom blocks the attention-output and MLP-down projections, "
            "biases and norms",
            bottom="outputs",
        ),
    )
}

if set(typing.get_args(PolicyName)) != set(POLICIES):  # pragma: no cover - a coding error
    raise RuntimeError("offsite.policies: PolicyName and POLICIES name different policies")
