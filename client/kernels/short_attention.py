"""Attention over short sequences as three batched matmuls, grouped heads folded, on CPU.

On CPU, torch's fused (flash) attention spends most of a short sequence's time in backward:
for short sequences (SmolLM2's 9 query and 3 key/value heads at 8 × 128 tokens in bf16) scores,
softmax and weighted sum written as batched matmuls take a fraction of its time forward and
backward together (the client's throughput with them: bench/reports/client.md). Backward
recomputes the probabilities from the query, key and mask it keeps (one batched matmul and a
softmax per block) rather than keeping them: 2.25 MB per block of 8 × 9 heads × 128 × 128 in
bf16, 22 MB of a 2-6-2 SmolLM2 emulator's saved activations, for no loss of throughput. Past
``SHORT_KEYS`` keys the fused kernel is the faster one, and is used.

Grouped query heads are folded into the sequence axis: the ``G`` query heads that share a
key/value head become one ``(G · T)``-row matrix against that head's keys, so no key or value
copies are made. Scores and probabilities stay in the input dtype, as in transformers' eager
attention under autocast (torch's bf16 softmax and its backward compute in fp32 inside and
round once); no fp32 copy of a (B, H, T, S) matrix is made, which kept peak memory level with
the fused kernel where fp32 scores had raised it by 30-60 MB on a 10-block emulator. Against
fp32 attention, bf16 relative errors at SmolLM2's shape: output 0.40 % (fused kernel 0.31 %),
query gradient 0.52 % (0.43 %), key 0.51 % (0.59 %), value 0.41 % (0.53 %). Masked positions
get the dtype's most negative value, not −inf, added to the scaled scores, and so a zero
probability after the softmax; a row with every key masked (a left-padding query) comes out
zero, as from the fused kernel, and passes no gradient back.
"""

from __future__ import annotations

from typing import Any

import torch

SHORT_KEYS = 160  # longest key length the matmul path takes; the fused kernel catches up above


def takes(
    query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, dropout: float
) -> bool:
    """Whether ``short_attention`` is the faster exact path for these inputs."""
    return (
        query.device.type == "cpu"
        and key.shape[-2] <= SHORT_KEYS
        and dropout == 0.0
        and mask is not None
        and mask.dtype == torch.bool
        and query.shape[1] % key.shape[1] == 0
    )


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The boolean mask as a score bias, (B or 1, 1, 1, T, S): 0 where a query attends, the
    dtype's most negative value where not."""
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return bias.masked_fill_(~mask, torch.finfo(dtype).min).unsqueeze(2)


def _probabilities(
    folded: torch.Tensor, key: torch.Tensor, mask: torch.Tensor, scale: float, groups: int
) -> torch.Tensor:
    """Masked softmax of the folded scores, (B, H_kv, G · T, S), in the inputs' dtype. The mask
    goes in as an added bias: a broadcast ``masked_fill_`` over the scores is an extra pass
    that costs more than the addition it replaces (20 calls a step at SmolLM2's shape), and the
    softmax makes masked probabilities 0 by itself. A row with every
    key masked comes out uniform here; ``_ShortAttention`` zeroes its output."""
    batch, kv_heads, rows, _ = folded.shape
    keys = key.shape[2]
    scores = torch.matmul(folded, key.transpose(-1, -2))
    scores = scores.view(batch, kv_heads, groups, rows // groups, keys)
    probs = torch.softmax(scores.mul_(scale).add_(_additive(mask, scores.dtype)), dim=-1)
    return probs.view(batch, kv_heads, rows, keys)


def _seeing_rows(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """1 for the queries that attend to some key, 0 for those that see none (left-padding
    queries), as a (B or 1, 1, T, 1) factor; None when every query sees a key."""
    seeing = mask.any(-1)  # (B or 1, 1, T)
    if bool(seeing.all()):
        return None
    return seeing.unsqueeze(-1).to(dtype)


class _ShortAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        batch, heads, length, dim = query.shape
        kv_heads = key.shape[1]
        groups = heads // kv_heads
        folded = query.reshape(batch, kv_heads, groups * length, dim)
        with torch.autocast(query.device.type, enabled=False):
            probs = _probabilities(folded, key, mask, scale, groups)
            out = torch.matmul(probs, value).view(batch, heads, length, dim)
        # rows that see no key: zero out, as torch's fused kernel gives, and no gradient back;
        # a factor, not a masked_fill (a slower broadcast pass of its own) nor indexing
        # (index kernels first used here raised the client's peak RSS by 4-8 MB)
        seeing = _seeing_rows(mask, out.dtype)
        if seeing is not None:
            out.mul_(seeing)
        ctx.save_for_backward(folded, key, value, mask)
        ctx.scale, ctx.groups = scale, groups
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        folded, key, value, mask = ctx.saved_tensors
        with torch.autocast(grad_out.device.type, enabled=False):
            probs = _probabilities(folded, key, mask, ctx.scale, ctx.groups)
            grad = grad_out.to(value.dtype)
            seeing = _seeing_rows(mask, grad.dtype)
            if seeing is not None:  # zeroed output rows pass no gradient back
                grad = grad * seeing
            grad = grad.reshape(folded.shape)
            grad_value = torch.matmul(probs.transpose(-1, -2), grad)
            grad_probs = torch.matmul(grad, value.transpose(-1, -2))
            # dS = P ⊙ (dP − rowsum(dP ⊙ P)): torch's own softmax backward, fp32 inside and
            # one rounding out, with no fp32 copies of the (B, H, T, S) matrices
            grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
            grad_scores.mul_(ctx.scale)
            grad_query = torch.matmul(grad_scores, key).view(grad_out.shape)
            grad_key = torch.matmul(grad_scores.transpose(-1, -2), folded)
        return grad_query, grad_key, grad_value, None, None


def short_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q·kᵀ·scale, masked) · v for (B, H, T, D) query, (B, H_kv, S, D) key and value
    and a boolean (B or 1, 1, T, S) mask (True: attend); (B, H, T, D) out."""
    if query.shape[1] % key.shape[1]:
        raise ValueError(
            f"{query.shape[1]} query heads do not share {key.shape[1]} key/value heads evenly"
        )
    if scale is None:
        scale = query.shape[-1] ** -0.5
    device = query.device.type
    if torch.is_autocast_enabled(device):  # as autocast treats torch's attention: one dtype
        dtype = torch.get_autocast_dtype(device)
        query, key, value = (t.to(dtype) for t in (query, key, value))
    out: torch.Tensor = _ShortAttention.apply(query, key, value, mask, float(scale))  # type: ignore[no-untyped-call]  # torch: apply is unannotated
    return out
