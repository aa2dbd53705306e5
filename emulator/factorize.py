"""Low-rank factorization of frozen linears: ``W ≈ U_r Σ_r V_rᵀ`` stored as two smaller linears.

A kept middle block shipped as-is is a verbatim copy of the owner's weights. Replacing each of
its linears by a truncated SVD (``up @ down``, rank ``r``) ships no original tensor, shrinks the
block when ``r < in·out / (in + out)``, and is a compression whose effect on the adapter's
gradients ``emulator.gradient_score`` can measure, so the rank can be chosen per matrix.

The error is known exactly: the best rank-``r`` approximation (Eckart–Young) leaves
‖W − up·down‖₂ = σ_{r+1} and ‖W − up·down‖_F = sqrt(Σ_{i>r} σ_i²); ``LowRankLinear.bound`` keeps
the Frobenius figure so callers (and tests) can check the product against it.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LowRankLinear(nn.Module):
    """``y = up(down(x)) + bias`` with ``down: in → r`` and ``up: r → out`` (both frozen)."""

    def __init__(
        self, in_features: int, out_features: int, rank: int, bias: bool, bound: float = 0.0
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)
        self.bound = bound  # Frobenius norm of W − up·down at construction

    @property
    def weight_product(self) -> torch.Tensor:
        return self.up.weight @ self.down.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))  # type: ignore[no-any-return]


def singular_values(linear: nn.Linear) -> torch.Tensor:
    return torch.linalg.svdvals(linear.weight.detach().double()).float()


def factorize_linear(linear: nn.Linear, rank: int) -> LowRankLinear:
    """The best rank-``rank`` factorization of ``linear`` (the singular values split evenly
    between the two factors, which keeps both well scaled)."""
    out_features, in_features = linear.weight.shape
    if not 1 <= rank <= min(out_features, in_features):
        raise ValueError(f"rank must be in [1, {min(out_features, in_features)}], got {rank}")
    u, s, vh = torch.linalg.svd(linear.weight.detach().double(), full_matrices=False)
    root = s[:rank].sqrt()
    bound = float(s[rank:].pow(2).sum().sqrt())
    factored = LowRankLinear(in_features, out_features, rank, linear.bias is not None, bound)
    with torch.no_grad():
        factored.down.weight.copy_((root[:, None] * vh[:rank]).to(linear.weight.dtype))
        factored.up.weight.copy_((u[:, :rank] * root[None, :]).to(linear.weight.dtype))
        if linear.bias is not None:
            factored.up.bias.copy_(linear.bias.detach())
    return factored.requires_grad_(False)


def rank_for_energy(linear: nn.Linear, energy: float) -> int:
    """The smallest rank keeping ``energy`` (0..1) of the squared singular values."""
    s2 = singular_values(linear).double().pow(2)
    cumulative = torch.cumsum(s2, 0) / s2.sum()
    found = int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=torch.float64))) + 1
    return min(found, len(s2))  # rounding can leave the last partial sum a hair below 1


def saves_bytes(linear: nn.Linear, rank: int) -> bool:
    """Whether rank ``rank`` stores fewer numbers than the dense matrix."""
    out_features, in_features = linear.weight.shape
    return rank * (in_features + out_features) < in_features * out_features


def break_even_rank(in_features: int, out_features: int) -> int:
    return math.floor(in_features * out_features / (in_features + out_features))
