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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from emulator.surgery import linear_weight, replace_module


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
        out: torch.Tensor = self.up(self.down(x))
        return out


def whitening(second_moment: torch.Tensor, damping: float = 1e-4) -> torch.Tensor:
    """Lower-triangular S with S·Sᵀ = M + damping·mean(diag M)·I: the damping keeps S
    invertible when calibration never excites some input directions."""
    moment = second_moment.double()
    ridge = damping * float(moment.diagonal().mean().clamp_min(1e-12))
    eye = torch.eye(moment.shape[0], dtype=torch.float64)
    factor: torch.Tensor = torch.linalg.cholesky(moment + ridge * eye)  # torch.linalg is untyped
    return factor


@dataclass
class Decomposition:
    """The SVD ``U·diag(s)·Vᵀ`` of ``Gᵀ·W·S`` (float64): S the inputs' whitening factor, G the
    output gradients' (``emulator.fisher``), each the identity when absent. Truncating it at
    rank r is the best rank-r fit of W in that metric; with both factors, ½·Σ_{i>r} s_i² is the
    loss rise the truncation costs (K-FAC), comparable across matrices."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    whitener: torch.Tensor | None = None
    output_whitener: torch.Tensor | None = None

    def energy_rank(self, energy: float) -> int:
        """The smallest rank keeping ``energy`` (0..1) of the squared singular values."""
        s2 = self.s.pow(2)
        cumulative = torch.cumsum(s2, 0) / s2.sum()
        found = int(torch.searchsorted(cumulative, torch.tensor(energy, dtype=torch.float64))) + 1
        return min(found, len(s2))  # rounding can leave the last partial sum a hair below 1

    def discarded(self, rank: int) -> float:
        """½·Σ_{i>rank} s_i²: under both whiteners, the estimated loss rise of the truncation."""
        return 0.5 * float(self.s[rank:].pow(2).sum())


def decompose(
    linear: nn.Linear,
    whitener: torch.Tensor | None = None,
    output_whitener: torch.Tensor | None = None,
) -> Decomposition:
    """One SVD of ``linear``'s weight in the metric its whiteners define (``Decomposition``)."""
    weighted = linear.weight.detach().double()
    if whitener is not None:
        weighted = weighted @ whitener
    if output_whitener is not None:
        weighted = output_whitener.T @ weighted
    u, s, vh = torch.linalg.svd(weighted, full_matrices=False)
    return Decomposition(u, s, vh, whitener, output_whitener)


def low_rank_from(linear: nn.Linear, found: Decomposition, rank: int) -> LowRankLinear:
    """``linear``'s rank-``rank`` truncation of ``found`` as a ``LowRankLinear`` (singular
    values split evenly between the factors, which keeps both well scaled; the whiteners
    undone by triangular solves). ``bound`` is the Frobenius norm of W − up·down."""
    out_features, in_features = linear.weight.shape
    if not 1 <= rank <= min(out_features, in_features):
        raise ValueError(f"rank must be in [1, {min(out_features, in_features)}], got {rank}")
    root = found.s[:rank].sqrt()
    down = root[:, None] * found.vh[:rank]
    if found.whitener is not None:  # (Σ½Vᵀ)·S⁻¹: down·S = Σ½Vᵀ
        down = torch.linalg.solve_triangular(found.whitener, down, upper=False, left=False)
    up = found.u[:, :rank] * root[None, :]
    if found.output_whitener is not None:  # G⁻ᵀ·(UΣ½): Gᵀ·up = UΣ½
        up = torch.linalg.solve_triangular(found.output_whitener.T, up, upper=True)
    weight = linear.weight.detach().double()
    bound = float((weight - up @ down).norm())
    factored = LowRankLinear(in_features, out_features, rank, linear.bias is not None, bound)
    with torch.no_grad():
        factored.down.weight.copy_(down.to(linear.weight.dtype))
        factored.up.weight.copy_(up.to(linear.weight.dtype))
        if linear.bias is not None:
            factored.up.bias.copy_(linear.bias.detach())
    return factored.requires_grad_(False)


def factorize_linear(
    linear: nn.Linear,
    rank: int,
    whitener: torch.Tensor | None = None,
    output_whitener: torch.Tensor | None = None,
) -> LowRankLinear:
    """The best rank-``rank`` factorization of ``linear``: best for the weight in Frobenius
    norm; given the ``whitener`` S of its inputs (``whitening`` of their second moment), best
    for the layer's output on those inputs; given also the ``output_whitener`` of its output
    gradients, best for the loss (K-FAC). ``bound`` is the Frobenius norm of W − up·down."""
    return low_rank_from(linear, decompose(linear, whitener, output_whitener), rank)


def rank_for_energy(linear: nn.Linear, energy: float, whitener: torch.Tensor | None = None) -> int:
    """The smallest rank keeping ``energy`` (0..1) of the squared singular values (of W·S
    given the inputs' whitening factor S)."""
    return decompose(linear, whitener).energy_rank(energy)


def saves_bytes(linear: nn.Linear, rank: int) -> bool:
    """Whether rank ``rank`` stores fewer numbers than the dense matrix."""
    out_features, in_features = linear.weight.shape
    return rank * (in_features + out_features) < in_features * out_features


def break_even_rank(in_features: int, out_features: int) -> int:
    return math.floor(in_features * out_features / (in_features + out_features))


def rank_cap(out_features: int, in_features: int, max_rank_fraction: float, multiple: int) -> int:
    """The largest rank a build may give an ``out × in`` matrix: ``max_rank_fraction`` of the
    break-even rank (so the factors are smaller than the matrix and never reproduce it
    exactly), a multiple of ``multiple`` when that leaves at least one multiple."""
    cap = max(1, math.floor(max_rank_fraction * break_even_rank(in_features, out_features)))
    aligned = cap // multiple * multiple
    return aligned if aligned >= multiple else cap


def choose_rank(
    linear: nn.Linear,
    energy: float,
    max_rank_fraction: float,
    multiple: int,
    whitener: torch.Tensor | None = None,
    found: Decomposition | None = None,
) -> int:
    """The rank a build gives ``linear`` by energy: the energy rank rounded up to
    ``multiple``, capped by ``rank_cap``. ``found``: its decomposition, if already made."""
    out_features, in_features = linear.weight.shape
    found = found or decompose(linear, whitener)
    wanted = math.ceil(found.energy_rank(energy) / multiple) * multiple
    rank = min(wanted, rank_cap(out_features, in_features, max_rank_fraction, multiple))
    if rank >= min(in_features, out_features):
        raise ValueError(f"rank {rank} would reproduce a {out_features}x{in_features} matrix")
    return rank


def allocate_ranks(
    spectra: Mapping[str, tuple[torch.Tensor, int, int]],
    budget: int,
    multiple: int,
    max_rank_fraction: float,
) -> dict[str, int]:
    """Ranks for many matrices sharing one parameter ``budget``: every matrix gets its first
    ``multiple`` singular values, then further groups of ``multiple`` go, largest first, to
    whichever matrix gains the most squared singular value per parameter (``spectra``: name ->
    (singular values, out, in), descending, all in one comparable metric, e.g. the loss
    weighting of ``decompose`` with both whiteners), within each matrix's ``rank_cap``.
    Greedy on a concave gain per matrix, so it is the best allocation up to one group."""
    ranks: dict[str, int] = {}
    caps: dict[str, int] = {}
    used = 0
    groups: list[tuple[float, str, int, int]] = []  # (-gain per parameter, name, start, size)
    for name, (values, out_features, in_features) in spectra.items():
        caps[name] = rank_cap(out_features, in_features, max_rank_fraction, multiple)
        ranks[name] = min(multiple, caps[name])
        used += ranks[name] * (in_features + out_features)
        energy = values.double().pow(2)
        for start in range(ranks[name], caps[name], multiple):
            size = min(multiple, caps[name] - start)
            gain = float(energy[start : start + size].sum()) / (size * (in_features + out_features))
            groups.append((-gain, name, start, size))
    closed: set[str] = set()
    for _, name, start, size in sorted(groups):
        _, out_features, in_features = spectra[name]
        cost = size * (in_features + out_features)
        if name in closed or start != ranks[name] or used + cost > budget:
            closed.add(name)  # a matrix's groups are taken in order or not at all
            continue
        ranks[name] += size
        used += cost
    return ranks


def _as_linear(module: nn.Module) -> nn.Linear:
    """``module`` itself, or GPT-2's ``Conv1D`` as an equivalent ``nn.Linear``."""
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
    gradient_moments: dict[str, torch.Tensor] | None = None,
    budget: float | None = None,
    reference_params: int | None = None,
) -> dict[str, Any]:
    """Replace each of ``linears`` (qualified names in ``model``) by its truncated SVD, in
    place; the manifest's factorization entry (rank and relative error per module).

    Whitened by its inputs' second moment where ``second_moments`` has one, and by its output
    gradients' where ``gradient_moments`` has one. Ranks come from ``energy`` per matrix, or,
    given ``budget`` (a share of the matrices' dense parameters), from one allocation across
    all of them (``allocate_ranks``), which is what the loss-comparable metric is for; the
    budget is a share of ``reference_params`` when given (the matrices before pruning)."""
    moments, gradients = second_moments or {}, gradient_moments or {}
    dense_linears = {name: _as_linear(module) for name, module in linears.items()}
    found: dict[str, Decomposition] = {}
    for name, linear in dense_linears.items():
        inputs, outputs = moments.get(name), gradients.get(name)
        found[name] = decompose(  # one whitening factor and one SVD per matrix
            linear,
            None if inputs is None else whitening(inputs),
            None if outputs is None else whitening(outputs),
        )
    total = sum(linear.weight.numel() for linear in dense_linears.values())
    if budget is not None:
        spectra = {n: (d.s, *dense_linears[n].weight.shape) for n, d in found.items()}
        basis = reference_params or total
        ranks = allocate_ranks(spectra, int(budget * basis), multiple, max_rank_fraction)
    else:
        ranks = {
            name: choose_rank(linear, energy, max_rank_fraction, multiple, found=found[name])
            for name, linear in dense_linears.items()
        }
    modules: dict[str, dict[str, Any]] = {}
    factored = 0
    for name, linear in dense_linears.items():
        rank = ranks[name]
        low = low_rank_from(linear, found[name], rank)
        replace_module(model, name, low)
        out_features, in_features = linear.weight.shape
        norm = float(linear.weight.detach().double().norm())
        modules[name] = {
            "rank": rank,
            "in": in_features,
            "out": out_features,
            "relative_error": low.bound / norm if norm else 0.0,
        }
        if gradients:
            modules[name]["estimated_loss_rise"] = found[name].discarded(rank)
        factored += rank * (in_features + out_features)
        del found[name]  # the factors are built: free the SVD
    errors = [m["relative_error"] for m in modules.values()]
    rule: dict[str, Any] = {"max_rank_fraction": max_rank_fraction, "rank_multiple": multiple}
    rule.update({"budget": budget} if budget is not None else {"energy": energy})
    if reference_params is not None and budget is not None:
        rule["budget_params"] = int(budget * reference_params)
    entry: dict[str, Any] = {
        "method": "fisher-svd" if gradients else "whitened-svd" if moments else "svd",
        "rule": rule,
        "modules": modules,
        "dense_params": total,
        "factored_params": factored,
        "mean_relative_error": sum(errors) / len(errors) if errors else 0.0,
        "min_relative_error": min(errors) if errors else 0.0,
    }
    if gradients:
        entry["estimated_loss_rise"] = sum(m["estimated_loss_rise"] for m in modules.values())
    return entry


def install_factorized_layers(
    model: nn.Module, modules: dict[str, Any], tensors: dict[str, dict[str, Any]]
) -> None:
    """Put empty ``LowRankLinear`` layers at ``modules`` (name -> manifest entry), each shaped
    from the manifest's tensor table (float factors ``{name}.down/up.weight`` or quantized ones
    ``.qweight``), so a bundle's factors find their places; ValueError if they do not fit."""
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
