"""The node's side of merge-exact LoRA aggregation (``coordinator.federation.merge_exact``).

Each round the global adapter carries the adapter blocks' merged LoRA base weights and a fresh
LoRA at the run's rank. The node

- trains at its own rank r ≤ the run's (``lora-rank`` node config, else the run's
  ``train.client_ranks`` by partition, else the run's rank): it starts from the first r rows of
  the fresh A (and the first r columns of B, zero) — PEFT's initialisation draws every row of A
  alike, so a cut is a valid start;
- puts the new base weights into its model in the form they run in (a packed int8 base is
  quantized again: ``client.kernels.linear.set_frozen_linear_weight``);
- uploads its factors, with B scaled so that ΔW = alpha/r · B·A has at most the DP clip norm,
  or, under secure aggregation, its dense ΔW (masked; clipped and noised under DP).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from client.kernels.linear import set_frozen_linear_weight
from emulator.adapter import AdaptedModel
from emulator.layers import renumber_state
from emulator.lora_merge import LORA_A, LORA_B, lora_deltas, scale_lora_b, split_bases


def node_rank(node_setting: object | None, client_ranks: str, partition: int, run_rank: int) -> int:
    """This node's LoRA rank: its own setting, else the run's ``client_ranks`` by partition,
    else ``run_rank``; refused when above ``run_rank`` (the fresh A has that many rows)."""
    if node_setting is not None:
        rank = int(str(node_setting))
    else:
        ranks = [int(r) for r in client_ranks.replace(" ", "").split(",") if r]
        rank = ranks[partition % len(ranks)] if ranks else run_rank
    if not 1 <= rank <= run_rank:
        raise ValueError(
            f"this node's LoRA rank {rank} is outside [1, {run_rank}] (the run's train.lora_r); "
            "set the node's lora-rank within it"
        )
    return rank


def cut_rank(lora: Mapping[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """The first ``rank`` rows of every A and columns of every B."""
    out = {}
    for name, tensor in lora.items():
        if name.endswith(LORA_A):
            out[name] = tensor[:rank].contiguous()
        elif name.endswith(LORA_B):
            out[name] = tensor[:, :rank].contiguous()
        else:
            out[name] = tensor
    return out


def start_round(
    adapted: AdaptedModel, global_state: Mapping[str, torch.Tensor], rank: int
) -> dict[str, torch.Tensor]:
    """Load the round's base weights and fresh LoRA (cut to ``rank``) into ``adapted``; the
    LoRA start, which ΔW is measured against."""
    bases, lora = split_bases(global_state)
    if not bases:
        raise ValueError(
            "a merge-exact round sent no LoRA base weights; the coordinator and node disagree "
            "on federation.lora_aggregation"
        )
    start = cut_rank(lora, rank)
    adapted.load_trainable(start)
    from_full = {full: own for own, full in adapted.to_full.items()}
    own = renumber_state(bases, adapted.prefix, from_full)
    if len(own) != len(bases):
        raise ValueError("the round's LoRA base weights name blocks this emulator does not hold")
    for name, weight in own.items():
        set_frozen_linear_weight(adapted.model, name.removesuffix(".weight"), weight)
    return start


def deltas(
    adapted: AdaptedModel, trained: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """ΔW per LoRA module (fp32, named by the base weight): what the node learned."""
    out = lora_deltas(trained, adapted.spec.lora_alpha, start, adapted.arch.lora_fan_in_fan_out)
    return {k: v.float() for k, v in out.items()}


def clip_factors(
    adapted: AdaptedModel,
    trained: Mapping[str, torch.Tensor],
    start: Mapping[str, torch.Tensor],
    clip: float,
) -> dict[str, torch.Tensor]:
    """The factors with B scaled so that the node's ΔW (over all modules) has L2 norm ≤
    ``clip`` — exact since a fresh LoRA's B starts at zero (ΔW = alpha/r · B·A)."""
    if any(t.any() for n, t in start.items() if n.endswith(LORA_B)):
        raise ValueError("merge-exact clipping needs a fresh LoRA (B = 0) at the round's start")
    norm = math.sqrt(
        sum(float(d.double().pow(2).sum()) for d in deltas(adapted, trained, start).values())
    )
    return scale_lora_b(trained, min(1.0, clip / norm) if norm > 0 else 1.0)
