"""Grouped-query attention without materialised key/value copies, for padded training batches.

Transformers' ``sdpa`` attention expands the key and value heads of a grouped-query model
(``repeat_kv``: SmolLM2's 3 key/value heads become 9) whenever an attention mask is given, and
training on left-padded batches always gives one. Scaled-dot-product attention saves its inputs
for backward, so every block then keeps the two expanded copies: 1.5 MB per SmolLM2 block at
8 × 128 tokens in bf16, 15 MB on a 10-block emulator. ``torch.nn.functional.
scaled_dot_product_attention(enable_gqa=True)`` computes the same attention on the unexpanded
heads; this module registers it with transformers as the ``offsite_sdpa`` implementation (the
``sdpa`` mask, the same arguments) so a client turns it on with one call.

On CPU, sequences of up to ``short_attention.SHORT_KEYS`` keys take the batched-matmul path
of ``client.kernels.short_attention`` instead (faster there, same numbers up to rounding).

Every case this path does not cover (no grouping, no mask, one query token, position bias,
soft-capping) goes to transformers' own ``sdpa`` function unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from client.kernels import short_attention
from emulator.arch import hf_model

IMPLEMENTATION = "offsite_sdpa"


def gqa_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Transformers' attention-function contract: (B, H, T, D) query, (B, H_kv, T, D) key and
    value in; (B, T, H, D) output and no weights out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = int(getattr(module, "num_key_value_groups", 1))
    plain = (
        groups == 1
        or attention_mask is None
        or query.shape[2] == 1
        or kwargs.get("position_bias") is not None
        or kwargs.get("softcap") is not None
    )
    if plain:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    if attention_mask is not None and short_attention.takes(query, key, attention_mask, dropout):
        output = short_attention.short_attention(query, key, value, attention_mask, scaling)
    else:
        output = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=dropout,
            scale=scaling,
            enable_gqa=True,
        )
    return output.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``offsite_sdpa`` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, gqa_sdpa_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def use_gqa_attention(model: nn.Module) -> bool:
    """Switch a grouped-query model that runs transformers' ``sdpa`` to ``offsite_sdpa``;
    returns whether it switched (other models and attention implementations are left alone)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None)
    if not heads or not kv_heads or kv_heads == heads:
        return False
    register()
    unwrap = getattr(model, "get_base_model", None)  # a PEFT wrapper's
    base = unwrap() if callable(unwrap) else model
    hf_model(base).set_attn_implementation(IMPLEMENTATION)
    return True
