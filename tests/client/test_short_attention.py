"""client.kernels.short_attention: torch's attention numbers, fewer passes, known saved bytes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from client.kernels.short_attention import SHORT_KEYS, short_attention, takes
from tests.conftest import saved_bytes


def _inputs(
    batch: int, heads: int, kv_heads: int, length: int, dim: int, keys: int | None = None
) -> tuple[torch.Tensor, ...]:
    """Query, key, value, upstream gradient and a causal, left-padded boolean mask (row ``i``
    has ``3 i`` padding tokens, so its first queries see no key at all)."""
    keys = keys or length
    generator = torch.Generator().manual_seed(batch * 100 + heads + length)
    query = torch.randn(batch, heads, length, dim, generator=generator)
    key = torch.randn(batch, kv_heads, keys, dim, generator=generator)
    value = torch.randn(batch, kv_heads, keys, dim, generator=generator)
    grad = torch.randn(batch, heads, length, dim, generator=generator)
    causal = torch.ones(length, keys, dtype=torch.bool).tril(keys - length)
    padding = torch.zeros(batch, keys, dtype=torch.bool)
    for row in range(batch):
        padding[row, : 3 * row] = True
    mask = causal[None, None] & ~padding[:, None, None, :]
    return query, key, value, grad, mask


def _run(attention, inputs, dtype):
    query, key, value, grad, mask = inputs
    leaves = [t.to(dtype).detach().requires_grad_() for t in (query, key, value)]
    out = attention(*leaves, mask)
    out.backward(grad.to(dtype))
    return [out.detach().float()] + [t.grad.float() for t in leaves]


def _fused(query, key, value, mask):
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=True)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(
    ("batch", "heads", "kv_heads", "length", "dim", "keys"),
    [(3, 4, 4, 16, 8, None), (2, 9, 3, 24, 16, None), (4, 8, 2, 12, 32, None), (2, 6, 3, 5, 8, 9)],
)
def test_fp32_matches_torch_attention_forward_and_gradients(
    batch: int, heads: int, kv_heads: int, length: int, dim: int, keys: int | None
) -> None:
    inputs = _inputs(batch, heads, kv_heads, length, dim, keys)
    ours = _run(short_attention, inputs, torch.float32)
    reference = _run(_fused, inputs, torch.float32)
    for name, got, want in zip(("out", "query", "key", "value"), ours, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=name)


def test_bf16_is_as_close_to_fp32_as_torch_fused_bf16_attention() -> None:
    """SmolLM2's attention shape at the client's batch: 8 × 128 tokens, 9 query heads on 3."""
    inputs = _inputs(8, 9, 3, 128, 64)
    reference = _run(_fused, inputs, torch.float32)
    ours = _run(short_attention, inputs, torch.bfloat16)
    fused = _run(_fused, inputs, torch.bfloat16)
    names = ("out", "query", "key", "value")
    for name, mine, theirs, want in zip(names, ours, fused, reference, strict=True):
        assert _relative(mine, want) < 1e-2, name
        assert _relative(mine, want) < 1.5 * _relative(theirs, want), name


def test_queries_that_see_no_key_give_zeros_and_no_gradient() -> None:
    query, key, value, grad, mask = _inputs(3, 4, 2, 10, 8)
    out, grad_query, _, _ = _run(short_attention, (query, key, value, grad, mask), torch.float32)
    blind = ~mask.any(-1)  # (batch, 1, length)
    assert blind.sum() > 0
    rows = blind.expand(-1, 4, -1)
    assert torch.isfinite(out).all() and torch.isfinite(grad_query).all()
    assert (out[rows] == 0).all() and (grad_query[rows] == 0).all()


def test_autocast_does_not_change_the_result() -> None:
    inputs = _inputs(2, 6, 2, 16, 16)
    plain = _run(short_attention, inputs, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = _run(short_attention, inputs, torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(plain, cast, strict=True))


def test_under_autocast_mixed_inputs_run_in_the_autocast_dtype() -> None:
    """Rotary embeddings in fp32 leave query and key fp32 next to a bf16 value."""
    query, key, value, _, mask = _inputs(2, 6, 2, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = short_attention(query, key, value.bfloat16(), mask)
        same = short_attention(query.bfloat16(), key.bfloat16(), value.bfloat16(), mask)
    assert mixed.dtype == torch.bfloat16 and torch.equal(mixed, same)


def test_it_keeps_the_folded_query_unexpanded_keys_values_and_the_mask_not_probabilities() -> None:
    batch, heads, kv_heads, length, dim = 2, 6, 2, 16, 8
    query, key, value, _, mask = _inputs(batch, heads, kv_heads, length, dim)
    leaves = [t.to(torch.bfloat16).detach().requires_grad_() for t in (query, key, value)]
    kept, _ = saved_bytes(lambda: short_attention(*leaves, mask).sum())
    elements = (
        batch * heads * length * dim  # query, folded into (batch, kv_heads, groups · length, dim)
        + 2 * batch * kv_heads * length * dim  # key and value as given
    )
    assert kept == 2 * elements + mask.numel()  # bf16, and the boolean mask (shared by blocks)


def test_the_path_is_taken_only_where_it_is_exact_and_faster() -> None:
    query, key, _, _, mask = _inputs(2, 6, 2, 16, 8)
    assert takes(query, key, mask, 0.0)
    assert not takes(query, key, mask, 0.1)  # attention dropout: torch's kernel
    assert not takes(query, key, None, 0.0)
    assert not takes(query, key, torch.zeros(mask.shape), 0.0)  # additive float mask
    long_key = torch.zeros(2, 2, SHORT_KEYS + 1, 8)
    assert not takes(query, long_key, mask, 0.0)
    assert not takes(query[:, :5], key, mask, 0.0)  # heads that do not share evenly
    with pytest.raises(ValueError, match="share"):
        short_attention(query[:, :5], key, key, mask)
