"""Forward passes that compute logits only where answers are (left-padded batches)."""

from __future__ import annotations

import inspect
from contextlib import AbstractContextManager, nullcontext
from functools import lru_cache

import torch
from torch import nn

from emulator.batches import Batch
from offsite.cpu import cpu_flags


@lru_cache(maxsize=64)
def _accepts(cls: type, name: str) -> bool:
    return name in inspect.signature(cls.forward).parameters


def _forward_class(model: nn.Module) -> type:
    base = getattr(model, "get_base_model", None)
    return type(base()) if callable(base) else type(model)


def answer_logits(model: nn.Module, batch: Batch, keep: int) -> torch.Tensor:
    """Logits for the last ``keep`` positions of each (left-padded) row: (B, keep, V)."""
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
        kwargs["use_cache"] = False
    logits = model(**kwargs).logits
    return logits[:, -keep:, :]


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
