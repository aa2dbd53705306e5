"""Forward passes that compute logits only where answers are (left-padded batches)."""

from __future__ import annotations

import inspect
from contextlib import AbstractContextManager, nullcontext
from functools import lru_cache
from typing import Any, cast

import torch
from torch import nn

from emulator.batches import Batch
from offsite.host.cpu import cpu_flags


@lru_cache(maxsize=64)
def _accepts(cls: type, name: str) -> bool:  # `type`: lru_cache's typing takes no type[Module]
    return name in inspect.signature(cast("type[nn.Module]", cls).forward).parameters


def _forward_class(model: nn.Module) -> type:
    base = getattr(model, "get_base_model", None)
    return type(base()) if callable(base) else type(model)


def _left_padded_forward(model: nn.Module, batch: Batch, keep: int, use_cache: bool) -> Any:
    """The model's output on a left-padded batch, logits for the last ``keep`` positions only
    where the model supports it."""
    cls = _forward_class(model)
    kwargs: dict[str, object] = {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
    }
    if _accepts(cls, "position_ids"):
        # Left padding: real tokens start at position 0 (absolute-position models need this).
        kwargs["position_ids"] = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    if _accepts(cls, "logits_to_keep"):
        kwargs["logits_to_keep"] = keep
    if _accepts(cls, "use_cache"):
        kwargs["use_cache"] = use_cache
    return model(**kwargs)


def answer_logits(model: nn.Module, batch: Batch, keep: int) -> torch.Tensor:
    """Logits for the last ``keep`` positions of each (left-padded) row: (B, keep, V)."""
    logits: torch.Tensor = _left_padded_forward(model, batch, keep, use_cache=False).logits
    return logits[:, -keep:, :]


def prompt_forward(model: nn.Module, batch: Batch, keep_cache: bool) -> tuple[torch.Tensor, object]:
    """Next-token log-probabilities after each (left-padded) prompt, (B, V) fp32, and its KV
    cache when ``keep_cache`` (None when the model keeps none)."""
    out = _left_padded_forward(model, batch, 1, use_cache=keep_cache)
    name = _cache_argument(_forward_class(model))
    cache = out.get(name) if keep_cache and name is not None else None
    return torch.log_softmax(out.logits[:, -1, :].float(), dim=-1), cache


def continuation_logprobs(
    model: nn.Module, batch: Batch, cache: object, continuation: list[int]
) -> torch.Tensor:
    """Log-probability, summed per row, of ``continuation[1:]`` after each prompt and
    ``continuation[0]``, reusing the prompts' KV cache (which this call extends): (B,)."""
    rows = batch.input_ids.shape[0]
    fed = torch.tensor(continuation[:-1], device=batch.input_ids.device).expand(rows, -1)
    steps = fed.shape[1]
    mask = torch.cat([batch.attention_mask, batch.attention_mask.new_ones(rows, steps)], dim=1)
    start = batch.attention_mask.sum(-1, keepdim=True)  # first new position of each row
    positions = start + torch.arange(steps, device=fed.device)
    cls = _forward_class(model)
    name = _cache_argument(cls)
    assert name is not None, "continuation_logprobs needs a model that keeps a KV cache"
    kwargs: dict[str, object] = {
        "input_ids": fed,
        "attention_mask": mask,
        name: cache,
        "use_cache": True,
    }
    if _accepts(cls, "position_ids"):
        kwargs["position_ids"] = positions
    logits = model(**kwargs).logits.float()
    targets = torch.tensor(continuation[1:], device=fed.device).expand(rows, -1)
    logprobs = torch.log_softmax(logits, dim=-1)
    return logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).sum(-1)


def _cache_argument(cls: type) -> str | None:
    """The forward's KV-cache argument: ``cache`` (transformers 5), ``past_key_values`` (4)."""
    for name in ("cache", "past_key_values"):
        if _accepts(cls, name):
            return name
    return None


def keeps_kv_cache(model: nn.Module) -> bool:
    """Whether the model's forward takes and returns a KV cache (decoder LMs do)."""
    cls = _forward_class(model)
    return _cache_argument(cls) is not None and _accepts(cls, "use_cache")


def answer_token_logprobs(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of the answer tokens and their mask: (B, span) each."""
    span = batch.answer_span
    logits = answer_logits(model, batch, span + 1)[:, :-1, :].float()
    targets = batch.labels[:, -span:]
    mask = targets != -100
    logprobs = torch.log_softmax(logits, dim=-1)
    picked = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * mask, mask


def answer_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy over answer tokens only."""
    span = batch.answer_span
    logits = answer_logits(model, batch, span + 1)[:, :-1, :].float()
    targets = batch.labels[:, -span:]
    return nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100
    )


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _cpu_has_bf16() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' becomes 'bf16' where the hardware runs bf16 matmuls natively, else 'fp32'."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if _cpu_has_bf16() else "fp32"


def autocast(precision: str, device: torch.device) -> AbstractContextManager[object]:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()
