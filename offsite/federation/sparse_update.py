"""Sparse upload: a client sends what it changed, optionally only the largest changes.

Format (one flat record of named arrays, so it travels in a Flower ``ArrayRecord``):

- ``delta/{name}``: the whole change of tensor ``name`` (dense);
- ``index/{name}`` (int64, flat positions, strictly increasing) with ``value/{name}`` (float32):
  the change at those positions only.

A tensor that did not change is not sent. With ``fraction < 1`` a client sends, per tensor, the
``ceil(fraction · numel)`` entries of largest magnitude and keeps the rest as a *residual* that is
added to its next round's change (error feedback, as in Deep Gradient Compression), so nothing is
lost, only delayed.

Decoding rebuilds the client's full trainable state (global + change, zero change where nothing
was sent). Every aggregation rule then sees exactly the update a dense upload of that change
would have produced, so FedAvg over sparse uploads equals FedAvg over their dense equivalents.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

DELTA, INDEX, VALUE = "delta/", "index/", "value/"


@dataclass
class UploadStats:
    tensors_sent: int
    tensors_total: int
    values_sent: int
    values_total: int
    bytes_sent: int

    @property
    def dense_bytes(self) -> int:
        return self.values_total * 4


def encode_update(
    trained: Mapping[str, torch.Tensor],
    global_state: Mapping[str, torch.Tensor],
    fraction: float = 1.0,
    residual: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], UploadStats]:
    """(arrays to send, residual to keep for the next round, stats) for one client update."""
    if not 0 < fraction <= 1:
        raise ValueError(f"upload fraction must be in (0, 1], got {fraction}")
    arrays: dict[str, torch.Tensor] = {}
    kept: dict[str, torch.Tensor] = {}
    sent_values = 0
    for name, value in trained.items():
        change = value.detach().float() - global_state[name].detach().float()
        carried = residual.get(name) if residual else None
        if carried is not None and carried.shape == change.shape:
            change = change + carried
        flat = change.reshape(-1)
        if not bool(flat.any()):
            continue
        if fraction >= 1:
            arrays[DELTA + name] = change.contiguous()
            sent_values += flat.numel()
            continue
        k = max(1, math.ceil(fraction * flat.numel()))
        index = flat.abs().topk(k, sorted=False).indices.sort().values
        arrays[INDEX + name] = index.to(torch.int64)
        arrays[VALUE + name] = flat[index].contiguous()
        rest = flat.clone()
        rest[index] = 0
        if bool(rest.any()):
            kept[name] = rest.reshape(change.shape)
        sent_values += k
    total = sum(t.numel() for t in trained.values())
    sent_bytes = sum(t.numel() * t.element_size() for t in arrays.values())
    touched = {key.split("/", 1)[1] for key in arrays}
    return arrays, kept, UploadStats(len(touched), len(trained), sent_values, total, sent_bytes)


def decode_update(
    arrays: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The client's full state (global + change) from a sparse upload; ValueError if malformed."""
    state = {name: tensor.detach().float().clone() for name, tensor in global_state.items()}
    for key, tensor in arrays.items():
        kind, _, name = key.partition("/")
        if name not in state:
            raise ValueError(f"sparse upload names {key!r}, which is not a global adapter tensor")
        if kind + "/" == DELTA:
            if tuple(tensor.shape) != tuple(state[name].shape):
                raise ValueError(
                    f"{key} has shape {tuple(tensor.shape)}, expected {tuple(state[name].shape)}"
                )
            state[name] += tensor.float()
        elif kind + "/" == INDEX:
            values = arrays.get(VALUE + name)
            if values is None:
                raise ValueError(f"{key} has no {VALUE + name}")
            _add_entries(state[name], tensor, values, name)
        elif kind + "/" != VALUE:
            raise ValueError(f"sparse upload has an unknown entry {key!r}")
        elif INDEX + name not in arrays:
            raise ValueError(f"{key} has no {INDEX + name}")
        if kind + "/" == DELTA and INDEX + name in arrays:
            raise ValueError(f"{name} is sent both dense and as entries")
    return state


def _add_entries(
    target: torch.Tensor, index: torch.Tensor, values: torch.Tensor, name: str
) -> None:
    if index.dtype != torch.int64 or index.dim() != 1:
        raise ValueError(
            f"index/{name} must be a 1-D int64 tensor, got {index.dtype}{list(index.shape)}"
        )
    if values.dim() != 1 or values.numel() != index.numel():
        raise ValueError(f"value/{name} must hold one value per index ({index.numel()})")
    if index.numel():
        if int(index.min()) < 0 or int(index.max()) >= target.numel():
            raise ValueError(f"index/{name} points outside the tensor ({target.numel()} values)")
        if index.numel() > 1 and not bool((index[1:] > index[:-1]).all()):
            raise ValueError(f"index/{name} must be strictly increasing (no repeats)")
    flat = target.view(-1)
    flat[index] += values.float()


def is_sparse(arrays: Mapping[str, torch.Tensor]) -> bool:
    """Whether a record is in this format (every key carries one of its prefixes)."""
    return all(key.startswith((DELTA, INDEX, VALUE)) for key in arrays)
