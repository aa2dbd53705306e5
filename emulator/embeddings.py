"""The emulator's token embeddings (and an untied head) stored weight-only quantized.

No update policy trains the embeddings or the head, so the bundle may carry them compressed.
They dominate small models with large vocabularies: Gemma3-270m's 262k × 640 embedding is
671 MB in fp32, 62 % of the model, against 168 MB in int8. Each row (one token) is quantized on
its own (``emulator.quant``'s int8 per output channel, or int4 in groups), stored as
``<name>.qweight`` / ``.scales`` [/ ``.zeros``], and expanded back to floats when the bundle is
loaded, so every runtime and kernel sees an ordinary embedding; a tied head ships once with it.
The full model, and so the plug-in, keeps its own full-precision embeddings.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

import torch
from torch import nn

from emulator.arch import hf_model
from emulator.quant import QuantScheme, dequantize, quantize_weight

MODES = ("full", "int8", "int4")
_ROWS = 16384  # rows expanded at a time when a bundle loads


def embedding_names(model: nn.Module) -> list[str]:
    """State-dict names of the input embedding and of an untied output head."""
    found = []
    hf = hf_model(model)
    embeddings = hf.get_input_embeddings()
    head = hf.get_output_embeddings()  # type: ignore[no-untyped-call]  # transformers: unannotated
    for module in (embeddings, head):
        weight = getattr(module, "weight", None)
        if weight is None:
            continue
        for name, candidate in model.named_parameters(remove_duplicate=True):
            if candidate is weight and name not in found:
                found.append(name)
    return found


def quantize_embeddings(
    model: nn.Module,
    state: MutableMapping[str, torch.Tensor],
    mode: str,
    group_size: int = 64,
) -> dict[str, Any] | None:
    """Replace the embedding tensors of ``state`` by their quantized parts (in place); the
    manifest's ``compression.embeddings`` entry, or None when ``mode`` is "full"."""
    if mode == "full":
        return None
    if mode not in MODES:
        raise ValueError(f"emulator.embeddings must be one of {MODES}, got {mode!r}")
    scheme = QuantScheme(mode, group_size, awq=False)
    names = [n for n in embedding_names(model) if n in state]
    before = after = 0
    for name in names:
        weight = state.pop(name)
        before += weight.numel() * weight.element_size()
        quantized = quantize_weight(weight, scheme)
        parts = {"qweight": quantized.qweight, "scales": quantized.scales}
        if quantized.zeros is not None:
            parts["zeros"] = quantized.zeros
        for part, tensor in parts.items():
            state[f"{name}.{part}"] = tensor.contiguous()
            after += tensor.numel() * tensor.element_size()
    return {"scheme": scheme.to_dict(), "tensors": names, "bytes_before": before, "bytes": after}


def expand_embeddings(
    state: MutableMapping[str, torch.Tensor], entry: Mapping[str, Any] | None, dtype: torch.dtype
) -> None:
    """Put float embeddings back in ``state`` in place of their quantized parts (bundle load)."""
    if not entry:
        return
    for name in entry["tensors"]:
        qweight, scales = state.pop(f"{name}.qweight"), state.pop(f"{name}.scales")
        zeros = state.pop(f"{name}.zeros", None)
        width = int(qweight.shape[1]) * (2 if qweight.dtype == torch.uint8 else 1)
        out = torch.empty(qweight.shape[0], width, dtype=dtype)
        for start in range(0, qweight.shape[0], _ROWS):  # rows at a time: no second full copy
            rows = slice(start, start + _ROWS)
            part_zeros = None if zeros is None else zeros[rows]
            out[rows] = dequantize(qweight[rows], scales[rows], part_zeros, dtype)
        state[name] = out
