"""Channel pruning of gated MLPs: drop the intermediate channels the LM loss needs least.

A gated MLP computes ``down(act(gate(x)) * up(x))``; its ``I`` intermediate channels are
independent until ``down`` sums them, so removing channel j (row j of gate and up, column j of
down) removes exactly the term ``h_j · down[:, j]`` from the output. A first-order (Taylor)
estimate of the loss that costs, averaged over the real tokens of public text, is
½·E[(h_j · ∂ℓ/∂h_j)²] (the diagonal of the empirical Fisher; Molchanov et al. 2019) — in the
same units as ``emulator.fisher``'s truncation cost, so one fraction of the middle's channels can
be spread across blocks where removing them costs least (the MLP half of GradOT's
"gradient-preserving compression": it prunes MLP channels and factorizes the attention).

Pruned layers are ordinary smaller linears; the manifest records the channels kept per MLP so a
bundle's model can be shaped before its tensors are loaded (``install_pruned_mlps``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from emulator.calibration import real_rows
from emulator.fisher import loss_backward
from emulator.surgery import replace_module


def channel_costs(
    model: nn.Module,
    mlps: Mapping[str, nn.Module],
    down_name: str,
    batches: Sequence[Mapping[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """½·E[(h_j·∂ℓ/∂h_j)²] per intermediate channel j of each of ``mlps`` (name -> module, its
    down projection at ``down_name``), h the down projection's input, ℓ the summed next-token
    loss of ``model`` (a causal LM) on ``batches``; float64, averaged over real tokens."""
    sums: dict[str, torch.Tensor] = {}
    mask: list[torch.Tensor] = []

    def watch(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def record(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            h = args[0]
            if not h.requires_grad:
                return

            def accumulate(grad: torch.Tensor) -> None:
                taylor = (h.detach().float() * grad.detach().float()).pow(2)
                rows = real_rows(taylor, mask[0] if mask else None).cpu()
                total = rows.double().sum(0)
                sums[name] = sums[name] + total if name in sums else total

            h.register_hook(accumulate)

        return record

    handles = [
        mlp.get_submodule(down_name).register_forward_pre_hook(watch(name))
        for name, mlp in mlps.items()
    ]
    try:
        tokens = loss_backward(model, batches, mask)
    finally:
        for handle in handles:
            handle.remove()
    return {name: 0.5 * total / tokens for name, total in sums.items()}


def allocate_channels(
    costs: Mapping[str, torch.Tensor], fraction: float, multiple: int
) -> dict[str, torch.Tensor]:
    """The channels each MLP keeps (sorted indices) when ``fraction`` of all channels go, the
    cheapest first across every MLP (the costs are comparable: loss units). Each MLP keeps a
    multiple of ``multiple`` channels (rounded up, so at most one group more than asked) and
    at least one group: no block loses its MLP."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the pruned fraction must be in [0, 1), got {fraction}")
    names = list(costs)
    everything = torch.cat([costs[n].double() for n in names])
    owner = torch.cat([torch.full((len(costs[n]),), i) for i, n in enumerate(names)])
    dropped = math.floor(fraction * len(everything))
    order = torch.argsort(everything, descending=True, stable=True)  # most costly first
    kept_mask = torch.zeros(len(everything), dtype=torch.bool)
    kept_mask[order[: len(everything) - dropped]] = True
    out: dict[str, torch.Tensor] = {}
    for i, name in enumerate(names):
        size = len(costs[name])
        wanted = int(kept_mask[owner == i].sum())
        count = min(size, max(multiple, math.ceil(wanted / multiple) * multiple))
        ranked = torch.argsort(costs[name].double(), descending=True, stable=True)
        out[name] = torch.sort(ranked[:count]).values
    return out


def prune_gated_mlp(mlp: nn.Module, keep: torch.Tensor, projections: tuple[str, str, str]) -> None:
    """Keep only the intermediate channels ``keep`` of ``mlp`` (its (gate, up, down) linears
    named by ``projections``), in place: rows of gate and up, columns of down."""
    old = _shrink(mlp, projections, len(keep))
    new = [_linear(mlp, name) for name in projections]
    with torch.no_grad():
        for before, after in zip(old[:2], new[:2], strict=True):  # gate and up: rows
            after.weight.copy_(before.weight[keep])
            if before.bias is not None and after.bias is not None:
                after.bias.copy_(before.bias[keep])
        new[2].weight.copy_(old[2].weight[:, keep])  # down: columns, the bias stays whole
        if old[2].bias is not None and new[2].bias is not None:
            new[2].bias.copy_(old[2].bias)


def _shrink(
    mlp: nn.Module, projections: tuple[str, str, str], kept: int
) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    """Replace ``mlp``'s (gate, up, down) linears by empty ones of ``kept`` intermediate
    channels (same device, dtype, bias and trainability); the replaced layers, in that
    order. ValueError if ``kept`` is not in 1..the channels it has."""
    gate_name, up_name, down_name = projections
    gate, up, down = (_linear(mlp, part) for part in projections)
    if not 1 <= kept <= gate.out_features:
        raise ValueError(f"an MLP cannot keep {kept} of its {gate.out_features} channels")
    replace_module(mlp, gate_name, _linear_like(gate, gate.in_features, kept))
    replace_module(mlp, up_name, _linear_like(up, up.in_features, kept))
    replace_module(mlp, down_name, _linear_like(down, kept, down.out_features))
    return gate, up, down


def _linear(mlp: nn.Module, name: str) -> nn.Linear:
    found = mlp.get_submodule(name)
    if not isinstance(found, nn.Linear):
        raise ValueError(f"{name} is a {type(found).__name__}, not a linear layer to prune")
    return found


def _linear_like(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    layer = nn.Linear(
        in_features,
        out_features,
        bias=old.bias is not None,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    return layer.requires_grad_(old.weight.requires_grad)


def prune_mlps(
    model: nn.Module,
    mlps: Mapping[str, nn.Module],
    projections: tuple[str, str, str],
    batches: Sequence[Mapping[str, torch.Tensor]],
    fraction: float,
    multiple: int,
) -> dict[str, Any]:
    """Prune ``fraction`` of the channels of ``mlps`` (qualified names in ``model``) where the
    loss needs them least, in place; the manifest's pruning entry (channels kept per MLP and
    the estimated loss rise)."""
    costs = channel_costs(model, mlps, projections[2], batches)
    missing = sorted(set(mlps) - set(costs))
    if missing:
        raise ValueError(f"no loss gradient reached the MLPs {missing[:3]}: nothing to score")
    kept = allocate_channels(costs, fraction, multiple)
    modules: dict[str, dict[str, Any]] = {}
    for name, mlp in mlps.items():
        prune_gated_mlp(mlp, kept[name], projections)
        removed = torch.ones(len(costs[name]), dtype=torch.bool)
        removed[kept[name]] = False
        modules[name] = {
            "kept": len(kept[name]),
            "of": len(costs[name]),
            "estimated_loss_rise": float(costs[name][removed].sum()),
        }
    total = sum(m["of"] for m in modules.values())
    return {
        "method": "fisher-taylor",
        "fraction": fraction,
        "rank_multiple": multiple,
        "projections": list(projections),
        "modules": modules,
        "channels": total,
        "kept_channels": sum(m["kept"] for m in modules.values()),
        "estimated_loss_rise": sum(m["estimated_loss_rise"] for m in modules.values()),
    }


def install_pruned_mlps(model: nn.Module, entry: Mapping[str, Any]) -> None:
    """Shape the MLPs a manifest's pruning ``entry`` names to their kept channels (empty
    layers, same device and dtype), so a bundle's tensors find places of their size;
    ValueError if the entry does not fit the model."""
    found = tuple(entry["projections"])
    if len(found) != 3:
        raise ValueError(f"pruning names {len(found)} projections, not (gate, up, down)")
    projections = (str(found[0]), str(found[1]), str(found[2]))
    for name, module_entry in entry["modules"].items():
        try:
            _shrink(model.get_submodule(name), projections, int(module_entry["kept"]))
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from err
