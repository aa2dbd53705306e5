"""The optional fifth setting: the same adapter recipe trained centrally on the full model."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from emulator.adapter import AdapterSpec, attach_adapter
from emulator.arch import arch_spec
from emulator.examples import training_batches
from emulator.forward import resolve_precision
from emulator.tokenizers import Tokenizer
from emulator.train import train_adapter
from offsite.config import OffsiteConfig, learning_rate
from offsite.data import Example

if TYPE_CHECKING:
    from transformers import PreTrainedConfig


def full_fine_tune(
    full_model: nn.Module,
    tokenizer: Tokenizer,
    adapter: AdapterSpec,
    examples: Sequence[Example],
    template: str,
    config: OffsiteConfig,
    device: torch.device,
    on_step: Callable[[int, float], None] | None = None,
) -> nn.Module:
    """Train ``adapter`` on a copy of the full model for as many steps as the whole federation ran.

    Steps = rounds × sampled clients × local steps, on the union of the clients' training data:
    the same examples seen, the same optimizer and learning rate.
    """
    federation = config.federation
    sampled = max(1, round(federation.num_clients * federation.fraction_train))
    steps = federation.rounds * sampled * config.train.local_steps
    model = copy.deepcopy(full_model).to(device)
    # full_model is a transformers PreTrainedModel; nn.Module types its attributes as
    # Tensor | Module
    model_config = cast("PreTrainedConfig", model.config)
    identity = {i: i for i in range(int(model_config.num_hidden_layers))}
    adapted = attach_adapter(model, arch_spec(model_config), adapter, identity, seed=config.seed)
    batches = training_batches(
        tokenizer,
        examples,
        template,
        max_words=config.data.max_words,
        max_length=config.data.max_length,
        batch_size=config.train.batch_size,
        seed=config.seed + 7,
    )
    torch.manual_seed(config.seed)
    train_adapter(
        adapted,
        batches,
        steps=steps,
        lr=learning_rate(config.train),
        precision=resolve_precision(config.train.precision, device),
        device=device,
        on_step=on_step,
    )
    return adapted.model
