"""Local fine-tuning of an adapter: a short AdamW loop over answer-only loss.

Used by the data-owner client on the emulator and by the coordinator for the optional
full-model fine-tuning baseline, so both train with exactly the same recipe.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch

from emulator.adapter import AdaptedModel
from emulator.batches import Batch
from emulator.forward import answer_loss, autocast
from emulator.optim import AdamW
from offsite.host.memory import trim_allocator


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    examples: int = 0
    tokens: int = 0
    seconds: float = 0.0

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else float("nan")


def train_adapter(
    adapted: AdaptedModel,
    batches: Iterator[Batch],
    *,
    steps: int,
    lr: float,
    precision: str,
    device: torch.device,
    on_step: Callable[[int, float], None] | None = None,
    trim_memory: bool = False,
    saved_tensors: Callable[[], AbstractContextManager[None]] | None = None,
    proximal_mu: float = 0.0,
) -> TrainResult:
    """Run ``steps`` optimizer steps on the adapter's trainable tensors.

    ``trim_memory`` hands the C heap's free pages back to the OS after every step on CPU
    (``offsite.host.memory``): a lower peak RSS for some throughput (the benchmark's full
    fine-tuning baselines measure it). ``saved_tensors`` wraps each step's forward and
    backward (the client's ``client.kernels.arena.ActivationArena.step``: activations in one
    reused buffer).

    ``proximal_mu`` > 0 is FedProx (Li et al. 2020): the loss gains ``mu/2 ||w − w_0||²`` over
    the trainable tensors, ``w_0`` their values before the first step (the round's global
    adapter). Its gradient ``mu (w − w_0)`` is added to the task gradient directly (no graph, one
    copy of the trainable tensors); the losses reported stay the task loss.
    """
    params = adapted.trainable_parameters()
    if not params:
        raise ValueError("the adapter has no trainable tensors")
    optimizer = AdamW(params, lr=lr, weight_decay=0.0)
    anchors = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    model = adapted.model
    model.train()
    result = TrainResult()
    start = time.perf_counter()
    for step in range(steps):
        batch = next(batches).to(device)
        with (saved_tensors or nullcontext)():
            with autocast(precision, device):
                loss = answer_loss(model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"training loss became {loss.item()} at step {step}; lower train.lr"
                )
            loss.backward()
        for param, anchor in zip(params, anchors, strict=False):  # FedProx (none without)
            if param.grad is not None:
                param.grad.add_(param.detach() - anchor, alpha=proximal_mu)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if trim_memory and device.type == "cpu":
            trim_allocator()
        value = float(loss.detach())
        result.losses.append(value)
        result.examples += int(batch.input_ids.shape[0])
        result.tokens += int(batch.attention_mask.sum())
        if on_step is not None:
            on_step(step, value)
    result.seconds = time.perf_counter() - start
    model.eval()
    return result
