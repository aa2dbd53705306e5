"""How much of a client's training text an adapter update gives away: a simple inversion baseline.

A linear layer's weight update is a sum of outer products ``δ_t x_tᵀ`` over the tokens it saw,
so for layers in the first adapter block (whose inputs are close to the token embeddings) the
update's row space points at the embeddings of the training tokens. The attack scores every
vocabulary token by how strongly the update responds to its (normalised) embedding and guesses
the top k as "tokens in the client's text" — a bag-of-words reconstruction. It needs nothing but
the update, the public embedding matrix and the adapter spec, i.e. what an honest-but-curious
coordinator holds without secure aggregation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from emulator.adapter import AdapterSpec


def effective_updates(
    before: Mapping[str, torch.Tensor],
    after: Mapping[str, torch.Tensor],
    spec: AdapterSpec,
    block: int,
) -> dict[str, torch.Tensor]:
    """Per linear of block ``block``: the change whose rows are combinations of its inputs
    (``[*, in]``: the weight change, or LoRA's A-factor change)."""
    marker = f".{block}."
    out: dict[str, torch.Tensor] = {}
    if spec.policy.lora:
        # LoRA's A factor moves by B^T·δ·xᵀ: its change's row space is spanned by the inputs
        for name in after:
            if marker in name and ".lora_A." in name:
                out[name.split(".lora_A.")[0]] = after[name].double() - before[name].double()
    else:
        for name, value in after.items():
            if marker in name and name.endswith(".weight") and value.dim() == 2:
                out[name[: -len(".weight")]] = value.double() - before[name].double()
    return out


def token_scores(updates: Mapping[str, torch.Tensor], embeddings: torch.Tensor) -> torch.Tensor:
    """Per vocabulary token: summed relative response of the updates to its unit embedding."""
    unit = embeddings.double()
    unit = unit / unit.norm(dim=1, keepdim=True).clamp(min=1e-12)
    scores = torch.zeros(unit.shape[0], dtype=torch.float64)
    for delta in updates.values():
        if delta.shape[1] != unit.shape[1]:
            continue  # reads something other than the residual stream
        response = (unit @ delta.t()).norm(dim=1)
        scores += response / response.mean().clamp(min=1e-30)
    return scores


@dataclass(frozen=True)
class Recovery:
    k: int
    precision: float  # share of the k guesses that occur in the training text
    recall: float  # share of the distinct training tokens among the k guesses
    chance_precision: float  # what k random guesses would reach on average

    def to_dict(self) -> dict[str, float]:
        return {
            "k": self.k,
            "precision": self.precision,
            "recall": self.recall,
            "chance_precision": self.chance_precision,
        }


def recovery(
    scores: torch.Tensor, used: Iterable[int], k: int, ignore: Iterable[int] = ()
) -> Recovery:
    """Score the top-``k`` guesses against the tokens actually trained on."""
    ignored = set(ignore)
    truth = set(used) - ignored
    candidates = [i for i in range(scores.shape[0]) if i not in ignored]
    ranked = sorted(candidates, key=lambda i: -float(scores[i]))[:k]
    hits = sum(1 for i in ranked if i in truth)
    return Recovery(k, hits / k, hits / max(len(truth), 1), len(truth) / max(len(candidates), 1))
