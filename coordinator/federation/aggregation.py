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
    # FedAvg over LoRA factors: how far it is from averaging the products (lora_product_error)
    lora_product_error: float | None = None


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
    error = None
    if rule.name == "fedavg":
        clients = [_unflatten(base + delta, global_state, names) for delta in deltas]
        error = lora_product_error(clients, examples.tolist())
    return AggregationResult(
        state, [u.node for u in kept], quarantined, clipped, selected, lora_product_error=error
    )


def lora_product_error(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> float | None:
    """‖mean(B)·mean(A) − mean(B·A)‖ / ‖mean(B·A)‖ over every LoRA module of the adapter.

    FedAvg averages a LoRA module's factors A (r × in) and B (out × r) separately, but what the
    clients learned is the product ΔW = B·A, and the mean of products is not the product of means:
    this is the relative error of the update the global adapter applies, in the Frobenius norm
    summed over modules, with FedAvg's weights. 0 when one client took part or every client kept
    the same A; None when the adapter has no LoRA factors.
    """
    total = sum(weights)
    share = [w / total for w in weights]
    difference = exact = 0.0
    found = False
    for name in states[0]:
        if ".lora_A." not in name:
            continue
        partner = name.replace(".lora_A.", ".lora_B.")
        if partner not in states[0]:
            continue
        found = True
        a = torch.stack([s[name].double() for s in states])  # clients × r × in
        b = torch.stack([s[partner].double() for s in states])  # clients × out × r
        w = torch.tensor(share, dtype=torch.float64)
        mean_of_products = torch.einsum("c,cor,cri->oi", w, b, a)
        mean_a = torch.einsum("c,cri->ri", w, a)
        mean_b = torch.einsum("c,cor->or", w, b)
        difference += float((mean_b @ mean_a - mean_of_products).pow(2).sum())
        exact += float(mean_of_products.pow(2).sum())
    if not found:
        return None
    return math.sqrt(difference / exact) if exact > 0 else 0.0
