"""client.kernels.rms_norm: forward bits of eager (within 4 ulps on the native loops), gradients
within bf16 rounding, half the bytes kept for backward under bf16 autocast."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from client.kernels import native
from client.kernels.rms_norm import LeanRMSNorm, lean_rms_norms, rms_norm
from client.runtime.decoder import RMSNorm


def _eager(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def _run(fn, x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, autocast: bool):
    x = x.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() != w.data_ptr():
            saved.append(t.numel() * t.element_size())
        return t

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), hooks:
        out = fn(x, w, 1e-6)
    out.backward(grad)
    return out.detach(), x.grad, w.grad, sum(saved)


@pytest.mark.parametrize("shape", [(3, 7, 64), (2, 5, 576), (16, 48)])
def test_fp32_matches_eager_and_keeps_no_more(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x, weight = torch.randn(shape) * 3, torch.randn(shape[-1])
    grad = torch.randn(shape)
    out, dx, dw, kept = _run(rms_norm, x, weight, grad, autocast=False)
    ref_out, ref_dx, ref_dw, ref_kept = _run(_eager, x, weight, grad, autocast=False)
    assert torch.equal(out, ref_out)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dw, ref_dw, rtol=1e-5, atol=1e-5)
    assert kept <= ref_kept


@pytest.mark.parametrize("loops", ["native", "torch"])
@pytest.mark.parametrize("shape", [(4, 32, 576), (2, 9, 128)])
def test_bf16_autocast_gradients_within_bf16_rounding_at_half_the_bytes(
    shape: tuple[int, ...], loops: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Residual stream in fp32 under bf16 autocast, as in a client's training step: on the
    native loops (one pass each way) and on torch ops (no C compiler)."""
    called: list[str] = []
    if loops == "torch":
        monkeypatch.setattr(native, "library", lambda: None)
    else:
        lib = native.library()
        assert lib is not None  # CI machines have a compiler

        class Spy:
            def __getattr__(self, name: str) -> object:
                called.append(name)
                return getattr(lib, name)

        monkeypatch.setattr(native, "library", lambda: Spy())
    torch.manual_seed(1)
    x, weight = torch.randn(shape), torch.rand(shape[-1]) + 0.5
    grad = torch.randn(shape)
    out, dx, dw, kept = _run(rms_norm, x, weight, grad, autocast=True)
    ref_out, ref_dx, ref_dw, ref_kept = _run(_eager, x, weight, grad, autocast=True)
    if loops == "torch":
        assert torch.equal(out, ref_out)
    else:  # the mean square summed in another order: rstd, and so x̂, within a few ulps
        torch.testing.assert_close(out, ref_out, rtol=4 * 2**-23, atol=0)
    expected = ["offsite_rms_norm", "offsite_rms_norm_backward"] if loops == "native" else []
    assert called == expected
    # the kept x̂ is rounded to bf16 (2⁻⁹ relative): a few of those on the gradient's scale
    scale = ref_dx.abs().max()
    assert (dx - ref_dx).abs().max() <= 4 * 2**-9 * scale
    torch.testing.assert_close(dw, ref_dw, rtol=2e-2, atol=4 * 2**-9 * float(ref_dw.abs().max()))
    rows = x.numel() // shape[-1]
    assert ref_kept >= x.numel() * 4  # eager keeps the fp32 input
    assert kept == x.numel() * 2 + rows * 4  # x̂ in bf16 and one fp32 rstd per row


def test_swap_keeps_the_parameter_and_the_forward() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(RMSNorm(32, 1e-5), nn.Linear(32, 4), nn.LayerNorm(4))
    model[0].weight.data.uniform_(0.5, 1.5)
    weight = model[0].weight
    x = torch.randn(3, 32)
    before = model(x)
    assert lean_rms_norms(model) == 1  # LayerNorm is not a Llama-style RMS norm
    assert isinstance(model[0], LeanRMSNorm) and model[0].weight is weight
    assert list(model.state_dict()) == ["0.weight", "1.weight", "1.bias", "2.weight", "2.bias"]
    assert torch.equal(model(x), before)
