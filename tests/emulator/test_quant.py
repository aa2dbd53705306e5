"""Quantized emulator: error bounds per scheme, the reference kernel's gradients, AWQ, bundles."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from emulator.adapter import AdapterSpec, attach_adapter
from emulator.arch import REGISTRY, arch_spec, block_list
from emulator.build import build_bundle
from emulator.bundle import bundle_arch, load_bundle_model, verify_bundle
from emulator.calibration import collect_activations
from emulator.examples import training_batches
from emulator.layers import plan_layers
from emulator.quant import (
    QuantLinear,
    QuantScheme,
    dequantize,
    error_bound,
    quantize_linears,
    quantize_weight,
    search_input_scale,
    unpack_int4,
)
from emulator.split import build_emulator
from emulator.train import train_adapter
from offsite.config import EmulatorConfig
from offsite.data import Example
from tests.conftest import (
    LABELS,
    LAYER_DROP_OVERRIDES,
    VOCAB,
    model_outputs,
    tiny_model,
    tiny_texts,
    write_public_text,
)

INT8 = QuantScheme("int8")
INT4 = QuantScheme("int4", group_size=64)
SHAPES = [(96, 128), (33, 64), (17, 36)]  # 36 is not a multiple of 64: one group per row


@pytest.mark.parametrize("scheme", [INT8, INT4], ids=["int8", "int4"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dequantize_error_is_within_half_a_step(scheme: QuantScheme, shape: tuple) -> None:
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.05
    weight[0, 3] = 0.9  # an outlier widens its group's step, nothing else's
    q = quantize_weight(weight, scheme)
    restored = dequantize(q.qweight, q.scales, q.zeros)
    assert restored.shape == weight.shape
    error = (restored - weight).abs()
    assert bool((error <= error_bound(q) * (1 + 1e-3) + 1e-7).all()), float(error.max())
    # the bound is tight enough to mean something: int8 rows ~1/254 of their range
    levels = 254 if scheme.name == "int8" else 15
    assert float(error.mean()) < float(weight.abs().max()) / levels
    stored = q.qweight.numel() * q.qweight.element_size()
    assert stored == weight.numel() * scheme.bits // 8


def test_int4_packing_round_trips() -> None:
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    assert torch.equal(unpack_int4(packed), codes)


def test_int8_beats_int4_on_the_same_weight() -> None:
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    errors = {}
    for scheme in (INT8, INT4):
        q = quantize_weight(weight, scheme)
        errors[scheme.name] = float(
            (dequantize(q.qweight, q.scales, q.zeros) - weight).abs().mean()
        )
    assert errors["int8"] < errors["int4"] / 5


def _quant_layer(scheme: QuantScheme, bias: bool = True) -> tuple[QuantLinear, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(48, 64, generator=gen) * 0.1
    scale = torch.rand(64, generator=gen) + 0.5
    q = quantize_weight(weight * scale, scheme)
    layer = QuantLinear.from_weight(q, scale, torch.randn(48, generator=gen) if bias else None)
    return layer, layer.dequantized_weight()


@pytest.mark.parametrize("scheme", [INT8, INT4], ids=["int8", "int4"])
def test_quant_linear_matches_dequantized_reference(scheme: QuantScheme) -> None:
    layer, weight = _quant_layer(scheme)
    x = torch.randn(3, 7, 64, requires_grad=True)
    out = layer(x)
    reference_x = x.detach().clone().requires_grad_(True)
    reference = nn.functional.linear(reference_x, weight, layer.bias)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    reference.backward(grad)
    torch.testing.assert_close(x.grad, reference_x.grad, rtol=1e-5, atol=1e-5)
    # frozen: nothing in the layer can receive a gradient
    assert not any(p.requires_grad for p in layer.parameters())
    assert all(b.grad is None for b in layer.buffers())


def test_quant_linear_saves_only_its_own_buffers_for_backward() -> None:
    """Nothing dequantized (and not even the input) is kept between forward and backward."""
    layer, _ = _quant_layer(INT4)
    buffers = {b.untyped_storage().data_ptr() for b in layer.buffers()}
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    x = torch.randn(4, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x).sum().backward()
    assert saved, "the kernel must save its quantized weights"
    assert {t.untyped_storage().data_ptr() for t in saved} <= buffers
    saved_bytes = sum(t.numel() * t.element_size() for t in saved)
    fp32_weight_bytes = layer.in_features * layer.out_features * 4
    assert saved_bytes < fp32_weight_bytes / 5, saved_bytes

    # a frozen nn.Linear of the same shape keeps its full fp32 weight for backward
    linear = nn.Linear(64, 48)
    linear.requires_grad_(False)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        linear(x).sum().backward()
    assert sum(t.numel() * t.element_size() for t in saved) >= fp32_weight_bytes


def test_quant_linear_under_bf16_autocast() -> None:
    layer, weight = _quant_layer(INT8)
    x = torch.randn(5, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    reference = nn.functional.linear(x, weight, layer.bias)
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.05)
    out.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32


class _Wrap(nn.Module):
    """A plain module called the way Hugging Face models are."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: object
    ) -> torch.Tensor:
        return self.inner(input_ids)


def test_awq_search_beats_round_to_nearest_on_outlier_channels() -> None:
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(64, 128, generator=gen) * 0.05
    rows = torch.randn(512, 128, generator=gen)
    rows[:, :4] *= 40  # a few channels carry most of the activation mass
    linear = nn.Linear(128, 64, bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    stats = collect_activations(_Wrap(linear), {"x": linear}, [{"input_ids": rows}])
    scale, alpha, awq_error = search_input_scale(weight, stats["x"], INT4)
    _, _, rtn_error = search_input_scale(weight, stats["x"], QuantScheme("int4", awq=False))
    assert alpha > 0 and awq_error < 0.8 * rtn_error, (alpha, awq_error, rtn_error)
    assert scale[:4].min() > scale[4:].max()  # the loud channels are the protected ones


def test_collect_activations_skips_padding() -> None:
    linear = nn.Linear(8, 4)
    x = torch.ones(2, 5, 8)
    x[0, :2] = 100.0  # left padding
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, :2] = 0
    stats = collect_activations(
        _Wrap(linear), {"x": linear}, [{"input_ids": x, "attention_mask": mask}]
    )
    assert stats["x"].count == 8
    torch.testing.assert_close(stats["x"].mean_abs(), torch.ones(8))


@pytest.mark.parametrize("model_type", sorted(REGISTRY))
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_bundle_loads_and_matches_in_memory_emulator(
    model_type: str, scheme: str, tokenizer, tmp_path: Path
) -> None:
    full = tiny_model(model_type)
    arch = arch_spec(full.config)
    plan = plan_layers(6, 1, 1, 3)
    spec = AdapterSpec("lora", plan.adapter_layers, 4, 8, arch.lora_targets)
    settings = EmulatorConfig(
        public_text=str(write_public_text(tmp_path)) if arch.causal_lm else "",
        public_examples=4,
        calibration_examples=8,
        factorize="none",
        quantize=scheme,
        quant_group_size=16,
    )
    bundle = build_bundle(
        full, tokenizer, arch, plan, spec, tmp_path / "b", source="tiny", settings=settings
    )
    bundle = verify_bundle(bundle.path, bundle.digest)
    quantization = bundle.manifest["compression"]["quantization"]
    assert quantization["scheme"]["name"] == scheme and quantization["modules"]
    tensors = bundle.manifest["tensors"]
    assert all(
        f"{m}.qweight" in tensors and f"{m}.weight" not in tensors for m in quantization["modules"]
    )
    if arch.causal_lm:
        assert quantization["calibrated"] == quantization["layers"]
    emulator = load_bundle_model(bundle)
    quant_layers = [m for m in emulator.modules() if isinstance(m, QuantLinear)]
    assert len(quant_layers) == len(quantization["modules"])
    # adapter blocks stay full precision
    blocks = block_list(emulator, arch)
    for index in plan.adapter_layers_in_emulator():
        assert not any(isinstance(m, QuantLinear) for m in blocks[index].modules())

    x = torch.randint(3, VOCAB, (2, 12))
    reference = build_emulator(full, plan, arch)
    approx = model_outputs(emulator, x)
    exact = model_outputs(reference, x)
    relative = float((approx - exact).norm() / exact.norm())
    assert relative < (0.02 if scheme == "int8" else 0.3), relative
    assert relative > 0  # it really is quantized

    # the privacy report counts quantized middle weights as not shipped verbatim
    privacy = bundle.manifest["privacy"]
    assert privacy["middle_tensors_verbatim"] < privacy["middle_tensors"]


def test_quantized_bundle_is_much_smaller(tokenizer, tmp_path: Path) -> None:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    full = transformers.LlamaForCausalLM(config).eval()
    arch = arch_spec(full.config)
    plan = plan_layers(6, 1, 1, -1)
    spec = AdapterSpec("lora", plan.adapter_layers, 4, 8, arch.lora_targets)
    sizes = {}
    for scheme in ("none", "int8", "int4"):
        settings = EmulatorConfig(public_text="", factorize="none", quantize=scheme)
        bundle = build_bundle(
            full, tokenizer, arch, plan, spec, tmp_path / scheme, source="t", settings=settings
        )
        sizes[scheme] = (bundle.path / "emulator.safetensors").stat().st_size
    embeddings = VOCAB * 128 * 4
    middle = {k: v - embeddings for k, v in sizes.items()}
    assert middle["int8"] < middle["none"] / 3.5
    assert middle["int4"] < middle["none"] / 6


def test_adapter_trains_through_a_quantized_emulator(tokenizer, tmp_path: Path) -> None:
    full = tiny_model("llama")
    arch = arch_spec(full.config)
    plan = plan_layers(6, 1, 1, 3)
    spec = AdapterSpec("lora", plan.adapter_layers, 4, 8, arch.lora_targets)
    settings = EmulatorConfig(
        public_text="", factorize="none", quantize="int4", quant_group_size=16
    )
    bundle = build_bundle(
        full, tokenizer, arch, plan, spec, tmp_path / "b", source="t", settings=settings
    )
    emulator = load_bundle_model(verify_bundle(bundle.path, bundle.digest))
    adapted = attach_adapter(emulator, bundle_arch(bundle), spec, plan.emulator_to_full())
    examples = [Example(t, label=lab) for lab in LABELS for t in tiny_texts(lab, 16)]
    batches = training_batches(
        tokenizer,
        examples,
        "Text: {text}\nTopic:",
        max_words=10,
        max_length=48,
        batch_size=8,
        seed=0,
    )
    torch.manual_seed(0)
    result = train_adapter(
        adapted, batches, steps=30, lr=5e-3, precision="fp32", device=torch.device("cpu")
    )
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5
    # the bottom block's LoRA learned: its gradient flowed back through the quantized middle
    state = adapted.trainable_state()
    bottom_b = [v for k, v in state.items() if ".layers.0." in k and "lora_B" in k]
    assert bottom_b and any(float(v.abs().max()) > 0 for v in bottom_b)


def test_quantization_is_recorded_and_needs_even_groups() -> None:
    with pytest.raises(ValueError, match="even"):
        QuantScheme("int4", group_size=3)
    with pytest.raises(ValueError, match="unknown"):
        QuantScheme("int3")
    assert QuantScheme.from_dict(INT4.to_dict()) == INT4
    assert json.loads(json.dumps(INT8.to_dict()))["group_size"] == 0


def test_quantize_linears_without_activations_is_round_to_nearest() -> None:
    linear = nn.Linear(32, 8)
    model = nn.Sequential(linear)
    report = quantize_linears(model, {"0": linear}, INT8)
    assert isinstance(model[0], QuantLinear) and report["calibrated"] == 0
    torch.testing.assert_close(model[0].input_scale, torch.ones(32))


def _build_cli(tmp_path: Path, model_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "offsite.cli.main",
            "emulator",
            "build",
            "-o",
            str(tmp_path / "b"),
            f"model.name={model_dir}",
            "emulator.bottom=1",
            "emulator.top=1",
            "emulator.keep=3",
            "emulator.public_text=''",
            *LAYER_DROP_OVERRIDES,
            "emulator.quant_group_size=16",
            "emulator.max_verbatim_fraction=0.5",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.integration  # a real `offsite` process end to end
def test_cli_quantized_build_passes_a_verbatim_gate_plain_drop_fails(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    plain = _build_cli(tmp_path, tiny_llama_dir)
    assert plain.returncode == 6 and "emulator refused" in plain.stderr, plain.stderr
    quantized = _build_cli(tmp_path, tiny_llama_dir, "--quantize", "int4")
    assert quantized.returncode == 0, quantized.stderr
    assert "middle linears int4" in quantized.stdout
    assert "% of the full model" in quantized.stdout
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["compression"]["quantization"]["scheme"]["bits"] == 4
    assert manifest["privacy"]["middle_verbatim_fraction"] <= 0.5
