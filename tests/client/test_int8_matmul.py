"""client.kernels.int8_matmul and .native: int8 × int8 linears within the bf16 bound, the C loops
giving the torch fallback's bits, and a client that still runs where no compiler is."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from client.kernels import PackedLinear, backends, native
from client.kernels.backends import integer_matmuls, scaled_forward
from client.kernels.int8_matmul import dequantize_rows, quantize_rows
from client.kernels.packed import pack_layer
from tests.client.test_kernels import BOUNDS, SHAPES, _layer, _reference, _relative

INTEGER_SHAPES = [*SHAPES, (1536, 576), (576, 1536)]  # + SmolLM2's MLP projections


@pytest.fixture
def torch_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch-ops fallback, as on a machine without a C compiler."""
    monkeypatch.setattr(native, "library", lambda: None)


def test_the_native_loops_build_here() -> None:
    """CI machines have a compiler: the fast path must not silently fall back there."""
    assert native.library() is not None
    assert native.library_path().is_file()


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "column-scaled"])
def test_native_quantize_gives_the_torch_fallbacks_bits(
    scaled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    generator = torch.Generator().manual_seed(3)
    x = (torch.randn(67, 200, generator=generator) * 3).to(torch.bfloat16)
    x[5] = 0.0  # an all-zero row keeps a finite scale and zero codes
    x[9, 17] = 1e30  # one outlier sets its row's scale
    columns = torch.rand(200, generator=generator) + 0.5 if scaled else None
    codes, scale = quantize_rows(x, columns)
    monkeypatch.setattr(native, "library", lambda: None)
    want_codes, want_scale = quantize_rows(x, columns)
    assert codes.dtype == torch.int8 and scale.shape == (67, 1)
    assert torch.equal(codes, want_codes) and torch.equal(scale, want_scale)
    assert (codes[5] == 0).all() and torch.isfinite(scale).all()
    assert codes[9, 17] == 127 and codes[9].abs().sum() == 127  # the rest round to 0


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "column-scaled"])
def test_native_dequantize_gives_the_torch_fallbacks_bits(
    scaled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    generator = torch.Generator().manual_seed(4)
    sums = torch.randint(-(2**30), 2**30, (45, 130), generator=generator, dtype=torch.int32)
    rows = torch.rand(45, 1, generator=generator) * 1e-6
    columns = torch.rand(130, generator=generator) if scaled else None
    out = dequantize_rows(sums, rows, columns)
    monkeypatch.setattr(native, "library", lambda: None)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, dequantize_rows(sums, rows, columns))


@pytest.mark.usefixtures("torch_only")
def test_rows_round_to_their_own_scale() -> None:
    x = torch.tensor([[1.0, -0.5, 0.25], [100.0, 3.0, -100.0], [0.0, 0.0, 0.0]])
    codes, scale = quantize_rows(x.to(torch.bfloat16))
    assert codes[:, 0].tolist() == [127, 127, 0] and codes[1, 2] == -127
    assert ((codes.float() * scale - x).abs() <= scale / 2 + 1e-6).all()  # half a step


@pytest.mark.parametrize("shape", INTEGER_SHAPES, ids=str)
def test_integer_matmuls_stay_within_the_bf16_bound_and_are_used(
    shape: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each activation (and gradient) is rounded to 1/254 of its row's largest: about four
    times bf16's own error on these inputs, inside the bf16 bound of ``test_kernels``."""
    calls: list[tuple[int, ...]] = []
    real = torch._int_mm

    def counting(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(a.shape))
        return real(a, b)

    monkeypatch.setattr(backends, "cpu_has_int8_dot", lambda: True)
    monkeypatch.setattr(torch, "_int_mm", counting)
    layer = _layer("int8", shape)
    fast = PackedLinear.from_quant(layer, torch.bfloat16)
    x = torch.randn(3, 40, shape[1], generator=torch.Generator().manual_seed(1))
    grad = torch.randn(3, 40, shape[0], generator=torch.Generator().manual_seed(2))
    x_ref = x.clone().requires_grad_(True)
    expected = _reference(layer, x_ref)
    expected.backward(grad)
    x_fast = x.to(torch.bfloat16).requires_grad_(True)
    out = fast(x_fast)
    out.backward(grad.to(torch.bfloat16))
    assert calls == [(120, shape[1]), (120, shape[0])]  # forward, then the input gradient
    assert out.dtype == torch.bfloat16 and x_fast.grad is not None and x_ref.grad is not None
    assert _relative(out, expected) < BOUNDS[torch.bfloat16]
    assert _relative(x_fast.grad, x_ref.grad) < BOUNDS[torch.bfloat16]


def test_integer_matmuls_only_where_they_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 compute, int4 groups and CPUs without int8 dot products keep the dequantize path
    (the same numbers as before), and a few rows keep the fused weight-only kernel."""
    int8_bf16 = pack_layer(_layer("int8", (96, 128)), torch.bfloat16)
    monkeypatch.setattr(backends, "cpu_has_int8_dot", lambda: True)
    assert integer_matmuls(int8_bf16)
    assert not integer_matmuls(pack_layer(_layer("int8", (96, 128)), torch.float32))
    assert not integer_matmuls(pack_layer(_layer("int4", (96, 128)), torch.bfloat16))
    x = torch.randn(40, 128, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    integer = backends.cpu_forward(x, int8_bf16, 1 << 22)
    few = backends.cpu_forward(x[:4], int8_bf16, 1 << 22)
    monkeypatch.setattr(backends, "cpu_has_int8_dot", lambda: False)
    assert not integer_matmuls(int8_bf16)
    dequantized = scaled_forward(x, int8_bf16, 1 << 22)
    assert torch.equal(backends.cpu_forward(x, int8_bf16, 1 << 22), dequantized)
    assert torch.equal(backends.cpu_forward(x[:4], int8_bf16, 1 << 22), few)
    assert _relative(integer, dequantized) < BOUNDS[torch.bfloat16]


def test_a_failed_build_says_why_once_and_the_layer_still_computes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No compiler (or a broken one): one warning naming the problem, torch ops instead."""
    monkeypatch.setenv("OFFSITE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setattr(backends, "cpu_has_int8_dot", lambda: True)
    native.library.cache_clear()
    try:
        with caplog.at_level("WARNING", logger=native.__name__):
            assert native.library() is None
            assert native.library() is None  # cached: not retried, not logged again
        assert len(caplog.records) == 1 and "no-such-compiler" in caplog.records[0].message
        packed = pack_layer(_layer("int8", (96, 128)), torch.bfloat16)
        x = torch.randn(40, 128, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
        reference = scaled_forward(x, packed, 1 << 22)
        assert _relative(backends.cpu_forward(x, packed, 1 << 22), reference) < 2e-2
        assert not (tmp_path / "native").exists() or not any((tmp_path / "native").glob("*.so"))
    finally:
        native.library.cache_clear()


def test_the_cached_build_is_keyed_by_source_flags_and_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OFFSITE_HOME", str(tmp_path))
    first = native.library_path()
    monkeypatch.setattr(native, "FLAGS", (*native.FLAGS, "-DOTHER"))
    assert native.library_path() != first
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset({"other"}))
    assert len({first, native.library_path()}) == 2
    assert first.parent == tmp_path / "native"
