"""Client side of differential privacy: clip the update, add this client's share of the noise.

Clipping bounds what one client can contribute (the sensitivity); the Gaussian noise is drawn
from a generator seeded by the operating system (``os.urandom``), never from a fixed seed, so
nobody can regenerate and subtract it. With secure aggregation each of at least ``t`` surviving
clients adds noise of variance σ²C²/t, so the sum carries at least σ²C² (distributed DP); without
it the coordinator can add the whole σC once to the aggregate.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import torch


def update_norm(update: Mapping[str, torch.Tensor]) -> float:
    """Global L2 norm over all tensors of an update."""
    squares = torch.zeros((), dtype=torch.float64)
    for tensor in update.values():
        squares = squares + tensor.double().pow(2).sum()
    return float(torch.sqrt(squares))


def clip_update(
    update: Mapping[str, torch.Tensor], max_norm: float
) -> tuple[dict[str, torch.Tensor], float]:
    """``update`` scaled to L2 norm at most ``max_norm``; also returns the norm before clipping."""
    if max_norm <= 0:
        raise ValueError("max_norm must be > 0")
    norm = update_norm(update)
    factor = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return {k: v * factor for k, v in update.items()}, norm


def os_generator(device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator seeded from the operating system's entropy."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))
    return generator


def add_gaussian_noise(
    update: Mapping[str, torch.Tensor],
    std: float,
    generator: torch.Generator | None = None,
    frozen: Callable[[str], bool] | None = None,
) -> dict[str, torch.Tensor]:
    """``update`` plus independent N(0, std²) noise on every coordinate but those of the
    tensors ``frozen`` names: they never change with the data, so they need no noise
    (LoRA's A under lora-fa; noising it would only add error)."""
    generator = generator or os_generator()
    return {
        k: v
        if frozen is not None and frozen(k)
        else v + std * torch.randn(v.shape, generator=generator, dtype=torch.float64).to(v.dtype)
        for k, v in update.items()
    }
