"""Plug a trained adapter into the full model (the product the model owner serves)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from emulator.adapter import AdaptedModel, AdapterSpec, attach_adapter
from emulator.arch import arch_spec, model_config


def plug_adapter(
    full_model: nn.Module, spec: AdapterSpec, state: Mapping[str, torch.Tensor]
) -> AdaptedModel:
    """Attach ``spec`` to ``full_model`` (in place) and load the trained tensors.

    Trainable tensors carry full-model block numbering, so the map is the identity.
    """
    arch = arch_spec(model_config(full_model))
    identity = {i: i for i in range(int(model_config(full_model).num_hidden_layers))}
    adapted = attach_adapter(full_model, arch, spec, identity)
    adapted.load_trainable(state)
    return adapted
