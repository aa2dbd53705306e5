"""Aggregation rules for adapter updates: FedAvg, trimmed mean, (multi-)Krum, with guards.

Every rule works on *updates* (client tensors minus the round's global tensors), so what is
bounded and compared is what a client changed. Guards applied before any rule:

- a reply whose tensors do not match the global adapter (names, shapes) or hold non-finite values
  is quarantined with the reason recorded;
- ``max_update_norm`` clips each update's global L2 norm (norm bounding);
- ``max_examples`` caps the example count a client claims (FedAvg weights by it).

Preconditions are checked at configuration time (``offsite.federation.robust.rule_problems``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from offsite.federation.robust import AggregationRule


@dataclass
class ClientUpdate:
    node: str
    state: Mapping[str, torch.Tensor]
    num_examples: int


@dataclass
class AggregationResult:
    state: dict[str, torch.Tensor]
    accepted: list[str]
    quarantined: dict[str, str] = field(default_factory=dict)  # node -> reason
    clipped: list[str] = field(default_factory=list)
    selected: list[str] = field(default_factory=list)  # Krum's choice


def _flatten(state: Mapping[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    return torch.cat([state[n].reshape(-1).double() for n in names])


def _unflatten(
    vector: torch.Tensor, like: Mapping[str, torch.Tensor], names: Sequence[str]
) -> dict[str, torch.Tensor]:
    out, offset = {}, 0
    for name in names:
        reference = like[name]
        size = reference.numel()
        out[name] = vector[offset : offset + size].reshape(reference.shape).to(reference.dtype)
        offset += size
    return out


def _problem(update: ClientUpdate, global_state: Mapping[str, torch.Tensor]) -> str | None:
    if set(update.state) != set(global_state):
        missing = sorted(set(global_state) - set(update.state))[:2]
        extra = sorted(set(update.state) - set(global_state))[:2]
        return f"tensor names differ from the global adapter (missing {missing}, extra {extra})"
    for name, tensor in update.state.items():
        if tuple(tensor.shape) != tuple(global_state[name].shape):
            expected = tuple(global_state[name].shape)
            return f"{name} has shape {tuple(tensor.shape)}, expected {expected}"
        if not torch.isfinite(tensor).all():
            return f"{name} holds non-finite values"
    if update.num_examples < 1:
        return f"claims {update.num_examples} training examples"
    return None


def krum_scores(vectors: torch.Tensor, byzantine: int) -> torch.Tensor:
    """Krum score per row: sum of squared distances to its n - f - 2 nearest other rows."""
    distances = torch.cdist(vectors, vectors).pow(2)
    n = vectors.shape[0]
    nearest = max(1, n - byzantine - 2)
    distances.fill_diagonal_(float("inf"))
    return distances.sort(dim=1).values[:, :nearest].sum(dim=1)


def aggregate(
    global_state: Mapping[str, torch.Tensor],
    updates: Sequence[ClientUpdate],
    rule: AggregationRule,
) -> AggregationResult:
    """The next global adapter from client ``updates`` under ``rule``.

    Raises ``ValueError`` when no update survives the guards (the caller keeps the old global).
    """
    names = sorted(global_state)
    quarantined: dict[str, str] = {}
    kept: list[ClientUpdate] = []
    for update in updates:
        reason = _problem(update, global_state)
        if reason:
            quarantined[update.node] = reason
        else:
            kept.append(update)
    if not kept:
        raise ValueError(f"no usable client update this round: {quarantined}")
    base = _flatten(global_state, names)
    deltas = torch.stack([_flatten(u.state, names) - base for u in kept])
    clipped = []
    if rule.max_update_norm > 0:
        norms = deltas.norm(dim=1)
        for i, norm in enumerate(norms.tolist()):
            if norm > rule.max_update_norm:
                deltas[i] *= rule.max_update_norm / norm
                clipped.append(kept[i].node)
    examples = torch.tensor(
        [
            min(u.num_examples, rule.max_examples) if rule.max_examples else u.num_examples
            for u in kept
        ],
        dtype=torch.float64,
    )
    selected: list[str] = []
    if rule.name == "fedavg":
        combined = (deltas * (examples / examples.sum()).unsqueeze(1)).sum(0)
    elif rule.name == "trimmed-mean":
        cut = math.floor(rule.trim_fraction * len(kept))
        ordered = deltas.sort(dim=0).values
        combined = ordered[cut : len(kept) - cut].mean(0)
    elif rule.name in ("krum", "multi-krum"):
        scores = krum_scores(deltas, rule.byzantine)
        count = 1 if rule.name == "krum" else (rule.krum_select or len(kept) - rule.byzantine)
        chosen = scores.argsort()[:count]
        selected = [kept[int(i)].node for i in chosen]
        combined = deltas[chosen].mean(0)
    else:
        raise ValueError(f"unknown aggregation rule {rule.name!r}")
    state = _unflatten(base + combined, global_state, names)
    return AggregationResult(state, [u.node for u in kept], quarantined, clipped, selected)
