"""Low-rank factorization of frozen linears: ``W ≈ U_r Σ_r V_rᵀ`` stored as two smaller linears.

A kept middle block shipped as-is is a verbatim copy of the owner's weights. Replacing each of
its linears by a truncated SVD (``up @ down``, rank ``r``) ships no original tensor, shrinks the
block when ``r < in·out / (in + out)``, and is a compression whose effect on the adapter's
gradients ``emulator.gradient_score`` can measure, so the rank can be chosen per matrix.

The error is known exactly: the best rank-``r`` approximation (Eckart–Young) leaves
‖W − up·down‖₂ = σ_{r+1} and ‖W − up·down‖_F = sqrt(Σ_{i>r} σ_i²); ``LowRankLinear.bound`` keeps
the Frobenius figure so callers (and tests) can check the product against it.

**Whitened (activation-aware) SVD** (``factorize='whitened-svd'``, the idea of SVD-LLM, Wang et
al. 2024): the weight error that matters is the error on the inputs the layer really sees,
‖(W − W')X‖_F. With the inputs' second moment M = E[x xᵀ] = S Sᵀ (Cholesky), that is
‖(W − W')S‖_F, so the best rank-``r`` W' is the truncated SVD of W·S mapped back by S⁻¹. At the
same rank it keeps far more of a block's function than plain SVD, whose spectrum of an LLM
weight is flat; the rank is chosen on the spectrum of W·S (energy of the layer's output).
"""

from __future__ import annotations

import math
from typing import Any

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


def whitening(second_moment: torch.Tensor, damping: float = 1e-4) -> torch.Tensor:
    """Lower-triangular S with S·Sᵀ = M + damping·mean(diag M)·I: the damping keeps S
    invertible when calibration never excites some input directions."""
    moment = second_moment.double()
    ridge = damping * float(moment.diagonal().mean().clamp_min(1e-12))
    eye = torch.eye(moment.shape[0], dtype=torch.float64)
    return torch.linalg.cholesky(moment + ridge * eye)


def _weighted(linear: nn.Linear, whitener: torch.Tensor | None) -> torch.Tensor:
    """W, or W·S given the whitening factor S of its inputs (float64)."""
    weight = linear.weight.detach().double()
    return weight if whitener is None else weight @ whitener


def factorize_linear(
    linear: nn.Linear, rank: int, whitener: torch.Tensor | None = None
) -> LowRankLinear:
    """The best rank-``rank`` factorization of ``linear`` (the singular values split evenly
    between the two factors, which keeps both well scaled): best for the weight in Frobenius
    norm, or, given the ``whitener`` S of its inputs (``whitening`` of their second moment),
    best for the layer's output on those inputs. ``bound`` is the Frobenius norm of
    W − up·down either way."""
    out_features, in_features = linear.weight.shape
    if not 1 <= rank <= min(out_features, in_features):
        raise ValueError(f"rank must be in [1, {min(out_features, in_features)}], got {rank}")
    u, s, vh = torch.linalg.svd(_weighted(linear, whitener), full_matrices=False)
    root = s[:rank].sqrt()
    down = root[:, None] * vh[:rank]
    if whitener is not None:  # (Σ½Vᵀ)·S⁻¹, by a triangular solve: down·S = Σ½Vᵀ
        down = torch.linalg.solve_triangular(whitener, down, upper=False, left=False)
    up = u[:, :rank] * root[None, :]
    weight = linear.weight.detach().double()
    bound = float((weight - up @ down).norm())
    factored = LowRankLinear(in_features, out_features, rank, linear.bias is not None, bound)
    with torch.no_grad():
        factored.down.weight.copy_(down.to(linear.weight.dtype))
        factored.up.weight.copy_(up.to(linear.weight.dtype))
        if linear.bias is not None:
            factored.up.bias.copy_(linear.bias.detach())
    return factored.requires_grad_(False)


def rank_for_energy(linear: nn.Linear, energy: float, whitener: torch.Tensor | None = None) -> int:
    """The smallest rank keeping ``energy`` (0..1) of the squared singular values (of W·S
    given the inputs' whitening factor S)."""
    s2 = torch.linalg.svdvals(_weighted(linear, whitener)).pow(2)
    cumulative = torch.cumsum(s2, 0) / s2.sum()
    found = int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=torch.float64))) + 1
    return min(found, len(s2))  # rounding can leave the last partial sum a hair below 1


def saves_bytes(linear: nn.Linear, rank: int) -> bool:
    """Whether rank ``rank`` stores fewer numbers than the dense matrix."""
    out_features, in_features = linear.weight.shape
    return rank * (in_features + out_features) < in_features * out_features


def break_even_rank(in_features: int, out_features: int) -> int:
    return math.floor(in_features * out_features / (in_features + out_features))


def choose_rank(
    linear: nn.Linear,
    energy: float,
    max_rank_fraction: float,
    multiple: int,
    whitener: torch.Tensor | None = None,
) -> int:
    """The rank a build gives ``linear``: the energy rank rounded up to ``multiple``, capped at
    ``max_rank_fraction`` of the break-even rank (so the factors are smaller than the matrix and
    never reproduce it exactly), and kept a multiple of ``multiple`` when the cap allows."""
    out_features, in_features = linear.weight.shape
    cap = max(1, math.floor(max_rank_fraction * break_even_rank(in_features, out_features)))
    wanted = math.ceil(rank_for_energy(linear, energy, whitener) / multiple) * multiple
    aligned_cap = cap // multiple * multiple
    rank = min(wanted, aligned_cap) if aligned_cap >= multiple else min(wanted, cap)
    if rank >= min(in_features, out_features):
        raise ValueError(f"rank {rank} would reproduce a {out_features}x{in_features} matrix")
    return rank


def _as_linear(module: nn.Module) -> nn.Linear:
    """``module`` itself, or GPT-2's ``Conv1D`` as an equivalent ``nn.Linear``."""
    from emulator.quant import linear_weight

    if isinstance(module, nn.Linear):
        return module
    found = linear_weight(module)
    if found is None:
        raise TypeError(f"{type(module).__name__} is not a linear layer")
    weight, bias = found
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear.to(weight.dtype)


def factorize_linears(
    model: nn.Module,
    linears: dict[str, nn.Module],
    energy: float,
    max_rank_fraction: float,
    multiple: int,
    second_moments: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Replace each of ``linears`` (qualified names in ``model``) by its truncated SVD, in
    place (whitened by its inputs' second moment where ``second_moments`` has one); the
    manifest's factorization entry (rank and relative error per module)."""
    from emulator.quant import replace_module

    modules: dict[str, dict[str, Any]] = {}
    dense = factored = 0
    moments = second_moments or {}
    for name, module in linears.items():
        linear = _as_linear(module)
        moment = moments.get(name)
        whitener = None if moment is None else whitening(moment)  # once per matrix
        rank = choose_rank(linear, energy, max_rank_fraction, multiple, whitener)
        low = factorize_linear(linear, rank, whitener)
        replace_module(model, name, low)
        out_features, in_features = linear.weight.shape
        norm = float(linear.weight.detach().double().norm())
        modules[name] = {
            "rank": rank,
            "in": in_features,
            "out": out_features,
            "relative_error": low.bound / norm if norm else 0.0,
        }
        dense += in_features * out_features
        factored += rank * (in_features + out_features)
    errors = [m["relative_error"] for m in modules.values()]
    return {
        "method": "whitened-svd" if moments else "svd",
        "rule": {
            "energy": energy,
            "max_rank_fraction": max_rank_fraction,
            "rank_multiple": multiple,
        },
        "modules": modules,
        "dense_params": dense,
        "factored_params": factored,
        "mean_relative_error": sum(errors) / len(errors) if errors else 0.0,
        "min_relative_error": min(errors) if errors else 0.0,
    }


def install_factorized_layers(
    model: nn.Module, modules: dict[str, Any], tensors: dict[str, dict[str, Any]]
) -> None:
    """Put empty ``LowRankLinear`` layers at ``modules`` (name -> manifest entry), each shaped
    from the manifest's tensor table (float factors ``{name}.down/up.weight`` or quantized ones
    ``.qweight``), so a bundle's factors find their places; ValueError if they do not fit."""
    from emulator.quant import linear_weight, replace_module

    for name, entry in modules.items():
        existing = model.get_submodule(name)
        found = linear_weight(existing)
        if found is None:
            raise ValueError(f"{name} is not a linear layer of this model")
        weight, _ = found
        out_features, in_features = weight.shape
        rank = int(entry["rank"])
        down = tensors.get(f"{name}.down.weight") or tensors.get(f"{name}.down.qweight")
        up = tensors.get(f"{name}.up.weight") or tensors.get(f"{name}.up.qweight")
        if down is None or up is None:
            raise ValueError(f"factorized layer {name} lacks its down/up factors")
        if tensors.get(f"{name}.weight") is not None:
            raise ValueError(f"factorized layer {name} also ships a dense weight")
        if down["shape"][0] != rank or up["shape"][0] != out_features:
            raise ValueError(
                f"factors of {name} do not have rank {rank} and {out_features} outputs"
            )
        bias = f"{name}.up.bias" in tensors
        layer = LowRankLinear(in_features, out_features, rank, bias)
        replace_module(model, name, layer.to(device=weight.device, dtype=weight.dtype))
