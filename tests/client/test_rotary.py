"""client.kernels.rotary: the fused rotary pass gives the torch ops' bits, forward and backward."""

from __future__ import annotations

import pytest
import torch

from client.kernels import native, rotary
from client.runtime.decoder import apply_rotary


def _tables(batch: int, length: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin of (per-row, when batch > 1) positions, as the lean decoder makes them."""
    positions = torch.arange(length)[None] + torch.arange(batch)[:, None] * 3
    freqs = positions[..., None].float() / (10000.0 ** (torch.arange(0, dim, 2) / dim))
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos(), angles.sin()


def _torch_ops(
    projected: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int
) -> torch.Tensor:
    """What the decoder ran before: view, transpose, rotate in fp32, cast to bf16 for attention."""
    batch, length, width = projected.shape
    q = projected.view(batch, length, heads, width // heads).transpose(1, 2)
    keys = torch.zeros(batch, 1, cos.shape[1], width // heads, dtype=q.dtype)  # not compared
    rotated, _ = apply_rotary(q, keys, cos, sin)
    return rotated.to(torch.bfloat16)


@pytest.mark.parametrize(
    ("table_batch", "length", "queries", "heads"),
    [(1, 12, 12, 3), (4, 12, 12, 9), (1, 12, 5, 9), (4, 7, 2, 3)],
    ids=["shared-table", "per-row-positions", "last-queries", "per-row-last-queries"],
)
def test_the_fused_rotary_gives_the_torch_ops_bits_both_ways(
    table_batch: int, length: int, queries: int, heads: int
) -> None:
    generator = torch.Generator().manual_seed(0)
    batch, dim = 4, 16
    cos, sin = _tables(table_batch, length, dim)
    projected = torch.randn(batch, queries, heads * dim, generator=generator).to(torch.bfloat16)
    grad = torch.randn(batch, heads, queries, dim, generator=generator).to(torch.bfloat16)
    results = []
    for fused in (True, False):
        x = projected.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert rotary.takes(x, cos)
            out = (
                rotary.rotary_heads(x, cos, sin, heads) if fused else _torch_ops(x, cos, sin, heads)
            )
        out.backward(grad)
        assert x.grad is not None
        results.append((out.detach(), x.grad))
    (out, dx), (want, want_dx) = results
    assert out.dtype == torch.bfloat16 and out.is_contiguous()
    assert out.shape == (batch, heads, queries, dim)
    assert torch.equal(out, want)
    assert torch.equal(dx, want_dx)


def test_the_fused_rotary_applies_only_under_bf16_autocast_with_the_loops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cos, _ = _tables(1, 8, 16)
    projected = torch.randn(2, 8, 48).to(torch.bfloat16)
    assert not rotary.takes(projected, cos)  # no autocast: fp32 compute keeps the torch ops
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert rotary.takes(projected, cos)
        assert not rotary.takes(projected.float(), cos)
        assert not rotary.takes(projected.transpose(0, 1), cos)  # not contiguous
        assert not rotary.takes(projected, cos[:, :4])  # a table shorter than the sequence
        monkeypatch.setattr(native, "library", lambda: None)
        assert not rotary.takes(projected, cos)
