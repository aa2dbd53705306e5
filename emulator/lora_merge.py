"""LoRA updates as dense weight changes: the arithmetic of exact ("merge-exact") aggregation.

A LoRA module adds ΔW = (alpha / r) · B·A to its base weight W. Averaging A and B separately
(naive FedAvg) does not average the ΔW the clients learned; averaging the ΔW does, whatever
each client's rank. These helpers work on adapter state dicts under PEFT's names (full-model
block numbering, as every adapter state in Offsite):

- ``base_name`` maps ``….q_proj.lora_A.default.weight`` to the module's base weight
  ``….q_proj.base_layer.weight`` (the name PEFT's tree and the client's lean tree both use);
- ``lora_deltas`` turns a state's factors into ΔW per module (the rank read from A's rows, so a
  client may train a lower rank than the global adapter's);
- ``fresh_lora`` re-draws A (PEFT's Kaiming-uniform) from a seed and zeroes B: a new round
  starts from the merged base with no LoRA contribution;
- ``refactorize`` writes an accumulated ΔW back as LoRA factors by SVD, at the rank that holds
  it (for export as a PEFT adapter), and reports the relative error of that rank.

Imported by both the client (clipping ΔW under DP, dense ΔW under secure aggregation) and the
coordinator (``coordinator.federation.merge_exact``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

LORA_A, LORA_B, BASE = ".lora_A.default.weight", ".lora_B.default.weight", ".base_layer.weight"


def is_base(name: str) -> bool:
    """Whether ``name`` is a LoRA module's base weight (carried by merge-exact adapters)."""
    return name.endswith(BASE)


def base_name(a_name: str) -> str:
    """The base weight of the LoRA module whose A factor is ``a_name``."""
    return a_name[: -len(LORA_A)] + BASE


def lora_modules(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The A-factor names of every LoRA module in ``state`` that also has its B, sorted."""
    return sorted(n for n in state if n.endswith(LORA_A) and n[: -len(LORA_A)] + LORA_B in state)


def split_bases(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(base weights, everything else) of an adapter state."""
    bases = {k: v for k, v in state.items() if is_base(k)}
    return bases, {k: v for k, v in state.items() if not is_base(k)}


def module_delta(
    a: torch.Tensor, b: torch.Tensor, alpha: float, fan_in_fan_out: bool = False
) -> torch.Tensor:
    """(alpha / r) · B·A in float64, laid out like the base weight (transposed for Conv1D)."""
    rank = a.shape[0]
    delta = (alpha / rank) * (b.double() @ a.double())
    return delta.t() if fan_in_fan_out else delta


def lora_deltas(
    state: Mapping[str, torch.Tensor],
    alpha: float,
    start: Mapping[str, torch.Tensor] | None = None,
    fan_in_fan_out: bool = False,
) -> dict[str, torch.Tensor]:
    """ΔW per LoRA module of ``state`` (float64, keyed by the base weight's name), minus what
    ``start``'s factors already added (cut to each module's rank) when given."""
    out = {}
    for a_name in lora_modules(state):
        b_name = a_name[: -len(LORA_A)] + LORA_B
        a, b = state[a_name], state[b_name]
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(f"{a_name}: LoRA factors {list(b.shape)} · {list(a.shape)} mismatch")
        delta = module_delta(a, b, alpha, fan_in_fan_out)
        if start is not None:
            rank = a.shape[0]
            a0, b0 = start[a_name][:rank], start[b_name][:, :rank]
            if b0.any():
                delta = delta - module_delta(a0, b0, alpha, fan_in_fan_out)
        out[base_name(a_name)] = delta
    return out


def scale_lora_b(state: Mapping[str, torch.Tensor], factor: float) -> dict[str, torch.Tensor]:
    """``state`` with every LoRA B multiplied by ``factor`` (ΔW = s·B·A scales with it, so a
    client clips its ΔW's norm without sending it densely)."""
    return {k: v * factor if k.endswith(LORA_B) else v for k, v in state.items()}


def fresh_lora(
    state: Mapping[str, torch.Tensor], seed: int, ranks: Mapping[str, int] | None = None
) -> dict[str, torch.Tensor]:
    """New LoRA factors shaped like ``state``'s (or at ``ranks[a_name]`` rows): A drawn
    Kaiming-uniform as PEFT initializes it (a = √5), from ``seed`` alone, B zero."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for a_name in lora_modules(state):
        b_name = a_name[: -len(LORA_A)] + LORA_B
        a, b = state[a_name], state[b_name]
        rank = ranks[a_name] if ranks else a.shape[0]
        # kaiming_uniform_(a=√5) on an (r, in) weight: bound = 1 / √in
        bound = 1.0 / math.sqrt(a.shape[1])
        drawn = torch.rand((rank, a.shape[1]), generator=generator, dtype=torch.float64)
        out[a_name] = ((2 * drawn - 1) * bound).to(a.dtype)
        out[b_name] = torch.zeros((b.shape[0], rank), dtype=b.dtype)
    return out


def refactorize(
    delta: torch.Tensor, rank: int | None = None, tolerance: float = 1e-7
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """LoRA factors (B, A) with B·A ≈ ``delta`` by truncated SVD, and the relative Frobenius
    error ‖B·A − delta‖ / ‖delta‖. ``rank=None`` keeps every singular value above
    ``tolerance`` × the largest (``delta``'s numerical rank: then exact to float rounding)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    if rank is None:
        rank = int((s > tolerance * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    rank = max(1, min(rank, s.numel()))
    root = s[:rank].sqrt()
    b = u[:, :rank] * root
    a = root.unsqueeze(1) * vh[:rank]
    norm = float(delta.double().norm())
    error = float((b @ a - delta.double()).norm()) / norm if norm > 0 else 0.0
    return b, a, error


def full_weight_name(base: str) -> str:
    """The plain model's name of a LoRA module's base weight (PEFT's tree removed)."""
    return base.split("base_model.model.", 1)[-1].replace(".base_layer.weight", ".weight")


def as_lora_adapter(
    state: Mapping[str, torch.Tensor],
    original: Mapping[str, torch.Tensor],
    alpha: float,
    fan_in_fan_out: bool = False,
) -> tuple[dict[str, torch.Tensor], int, float]:
    """A merge-exact adapter ``state`` (merged base weights + LoRA) as plain LoRA factors on
    the ``original`` model (its state dict): each module's whole change — merged base −
    original base + alpha/r·B·A — refactorized by SVD at its numerical rank, every module at
    the largest such rank R (smaller ones padded with zeros) with scale 1 (alpha = R). Returns
    (LoRA state under the adapter's names, R, the largest relative error of a module)."""
    bases, lora = split_bases(state)
    change = {
        name: bases[name].double() - original[full_weight_name(name)].double() for name in bases
    }
    for name, delta in lora_deltas(lora, alpha, fan_in_fan_out=fan_in_fan_out).items():
        change[name] = change[name] + delta
    factors = {}
    worst = 0.0
    for name, delta in change.items():
        matrix = delta.t() if fan_in_fan_out else delta  # LoRA's B·A is (out, in)
        b, a, error = refactorize(matrix)
        factors[name] = (b, a)
        worst = max(worst, error)
    rank = max(b.shape[1] for b, _ in factors.values())
    out = {}
    for name, (b, a) in factors.items():
        stem = name[: -len(BASE)]
        padded_a = torch.zeros(rank, a.shape[1], dtype=torch.float64)
        padded_b = torch.zeros(b.shape[0], rank, dtype=torch.float64)
        padded_a[: a.shape[0]], padded_b[:, : b.shape[1]] = a, b
        out[stem + LORA_A], out[stem + LORA_B] = padded_a.float(), padded_b.float()
    return out, rank, worst
