"""How much of a client's training data an adapter update gives away: two inversion baselines.

*Label inference* (``answer_shift``): plug the global and the client's adapter into the public
model and compare the answer distribution on public prompts; the answers the client trained on
rise. Under non-IID data this tells the coordinator what a client's data is about.

*Bag of words* (``token_scores``):
a linear layer's weight update is built from outer products ``δ_t x_tᵀ`` over the tokens it saw
(AdamW rescales it per element, which blurs but does not remove that structure), so in the first
adapter block, whose inputs are nearly a function of the token alone, the update responds most
to the inputs of the tokens the client trained on. The attack feeds every vocabulary token
through the public model up to that block, records what each linear reads (``token_inputs``),
scores each token by the update's relative response to it (``token_scores``) and guesses the top
k as "tokens in the client's text".

Both need only the update, the global adapter and the public model: what an honest-but-curious
coordinator holds without secure aggregation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from emulator.adapter import AdaptedModel, AdapterSpec


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


class _StopForward(Exception):
    """Raised by a hook once the attacked block has run: nothing above it is needed."""


@torch.no_grad()
def token_inputs(
    adapted: AdaptedModel, block: int, batch_size: int = 2048
) -> dict[str, torch.Tensor]:
    """Per linear of full-model block ``block``: what it reads when each vocabulary token is fed
    alone, ``[vocab, in]`` (the normalisation and attention in front of it included, so the
    attack compares the update against the linear's real inputs, not raw embeddings)."""
    from_full = {full: own for own, full in adapted.to_full.items()}
    if block not in from_full:
        raise ValueError(f"block {block} is not in this model (it holds {sorted(from_full)})")
    blocks = adapted.model.get_submodule(adapted.prefix)
    target = blocks[from_full[block]]
    linears = {  # names as effective_updates keys them (PEFT's wrapped base layer unwrapped)
        f"{adapted.prefix}.{block}.{name.removesuffix('.base_layer')}": module
        for name, module in target.named_modules()
        if isinstance(module, torch.nn.Linear) and "lora_" not in name
    }
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in linears}

    def recorder(name: str):
        def record(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            captured[name].append(args[0].reshape(-1, args[0].shape[-1]).float().cpu())

        return record

    hooks = [module.register_forward_pre_hook(recorder(n)) for n, module in linears.items()]

    def stop(*_args: object) -> None:
        raise _StopForward

    hooks.append(target.register_forward_hook(stop))
    vocab = int(adapted.model.get_input_embeddings().weight.shape[0])
    device = next(adapted.model.parameters()).device
    was_training = adapted.model.training
    adapted.model.eval()
    try:
        for start in range(0, vocab, batch_size):
            ids = torch.arange(start, min(start + batch_size, vocab), device=device)[:, None]
            with contextlib.suppress(_StopForward):
                adapted.model(input_ids=ids)
    finally:
        for hook in hooks:
            hook.remove()
        adapted.model.train(was_training)
    return {name: torch.cat(parts) for name, parts in captured.items() if parts}


def token_scores(
    updates: Mapping[str, torch.Tensor], inputs: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """Per vocabulary token: summed relative response of each linear's update to that token's
    (unit-normalised) input to the linear."""
    scores: torch.Tensor | None = None
    for name, delta in updates.items():
        if name not in inputs:
            raise KeyError(
                f"no token inputs recorded for {name}; pass token_inputs(...) of this block"
            )
        x = inputs[name]
        response = (x @ delta.to(x.dtype).t()).norm(dim=1) / x.norm(dim=1).clamp(min=1e-12)
        part = response.double() / response.double().mean().clamp(min=1e-30)
        scores = part if scores is None else scores + part
    if scores is None:
        raise ValueError("no update of the attacked block to score")
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
    vocab = int(scores.shape[0])
    ignored = {i for i in ignore if 0 <= i < vocab}
    truth = set(used) - ignored
    masked = scores.double().clone()
    if ignored:
        masked[torch.tensor(sorted(ignored))] = float("-inf")
    candidates = vocab - len(ignored)
    ranked = masked.topk(min(k, candidates)).indices.tolist()
    hits = sum(1 for i in ranked if i in truth)
    return Recovery(k, hits / k, hits / max(len(truth), 1), len(truth) / max(candidates, 1))


@torch.no_grad()
def answer_shift(
    before: torch.Tensor, after: torch.Tensor, candidates: Sequence[int]
) -> torch.Tensor:
    """Label inference: per candidate answer token, the mean rise of its log-probability at the
    answer position of public prompts when the global adapter is replaced by the client's.

    ``before`` / ``after``: ``[prompts, vocab]`` logits at the answer position with the global /
    the client's adapter. Fine-tuning raises the answers a client trained on, so the top
    candidate guesses the client's majority label; per-element optimiser scaling (AdamW) does
    not hide it.
    """
    if before.shape != after.shape or before.dim() != 2 or before.shape[0] == 0:
        raise ValueError(
            f"expected two equal [prompts, vocab] logits, got {before.shape}, {after.shape}"
        )
    index = torch.tensor(list(candidates))
    old = torch.log_softmax(before.double(), dim=-1)[:, index]
    new = torch.log_softmax(after.double(), dim=-1)[:, index]
    return (new - old).mean(dim=0)
