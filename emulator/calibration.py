"""What a model's linears see on public calibration text: the statistics that activation-aware
quantization (AWQ scales), whitened SVD (input second moments) and the Fisher weighting
(``emulator.fisher``) are computed from."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

CALIBRATION_ROWS = 512  # input rows kept per linear for the AWQ search


@dataclass
class Activations:
    """Per-linear input statistics gathered on calibration text."""

    abs_sum: torch.Tensor
    count: int
    rows: torch.Tensor  # up to CALIBRATION_ROWS input rows (fp32)
    gram: torch.Tensor | None = None  # Σ x xᵀ over every real row (float64), when asked for

    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.count, 1)

    def second_moment(self) -> torch.Tensor:
        """E[x xᵀ] over the calibration rows (what an activation-aware factorization weighs)."""
        if self.gram is None:
            raise ValueError("activations were collected without gram=True")
        return self.gram / max(self.count, 1)


def real_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Input rows of a linear without padding positions (some models flatten batch and time)."""
    if mask is not None:
        keep = mask.to(x.device).bool()
        if tuple(x.shape[:-1]) == tuple(keep.shape):
            return x[keep]
        if x.dim() == 2 and x.shape[0] == keep.numel():
            return x[keep.reshape(-1)]
    return x.reshape(-1, x.shape[-1])


@torch.no_grad()
def collect_activations(
    model: nn.Module,
    linears: Mapping[str, nn.Module],
    batches: Sequence[Mapping[str, torch.Tensor]],
    seed: int = 0,
    gram: bool = False,
) -> dict[str, Activations]:
    """Run ``model`` on ``batches`` and record what enters each linear (padding excluded);
    with ``gram`` also the full second moment of its inputs (in × in, float64)."""
    stats: dict[str, Activations] = {}
    generator = torch.Generator().manual_seed(seed)
    mask: list[torch.Tensor] = []

    def hook(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def record(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().float()
            x = real_rows(x, mask[0] if mask else None)
            x = x.cpu()
            entry = stats.get(name)
            if entry is None:
                entry = stats[name] = Activations(torch.zeros(x.shape[-1]), 0, x[:0])
                if gram:
                    entry.gram = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64)
            entry.abs_sum += x.abs().sum(0)
            if entry.gram is not None:
                entry.gram += (x.T @ x).double()
            entry.count += x.shape[0]
            rows = torch.cat((entry.rows, x))
            if rows.shape[0] > CALIBRATION_ROWS:
                pick = torch.randperm(rows.shape[0], generator=generator)[:CALIBRATION_ROWS]
                rows = rows[pick]
            entry.rows = rows

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        device = next(model.parameters()).device
        for batch in batches:
            mask[:] = [batch["attention_mask"]] if "attention_mask" in batch else []
            model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return stats
