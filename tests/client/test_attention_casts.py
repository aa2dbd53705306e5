"""client.kernels.attention and client.kernels.casts: less kept for backward, same numbers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from client.kernels import short_attention
from client.kernels.attention import IMPLEMENTATION, use_gqa_attention
from client.kernels.casts import cast_norm_outputs
from emulator.adapter import AdaptedModel, AdapterSpec, attach_adapter
from emulator.arch import REGISTRY, arch_spec
from emulator.layers import plan_layers
from emulator.split import build_emulator
from tests.conftest import VOCAB, saved_bytes, tiny_model

GROUPED = ("llama", "mistral", "qwen2", "gemma3_text")  # tiny configs: 4 heads, 2 key/value
CAST_NORMS = sorted(name for name, spec in REGISTRY.items() if spec.linear_input_norms)
BATCH, LENGTH = 3, 24


def _padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask, as the client trains on (rows of 24, 17 and 9 tokens)."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (BATCH, LENGTH), generator=generator)
    mask = torch.ones(BATCH, LENGTH, dtype=torch.long)
    for row, pad in enumerate((0, 7, 15)):
        mask[row, :pad] = 0
    return ids, mask


def _lora_emulator(model_type: str) -> AdaptedModel:
    full = tiny_model(model_type)
    arch = arch_spec(full.config)
    plan = plan_layers(6, 1, 1, 2)
    emulator = build_emulator(full, plan, arch)
    spec = AdapterSpec.for_plan("lora", plan, arch, 4, 8)
    adapted = attach_adapter(emulator, arch, spec, plan.emulator_to_full())
    adapted.model.train()
    return adapted


def _loss(model: nn.Module, precision: str = "fp32"):
    ids, mask = _padded_batch()

    def run() -> torch.Tensor:
        torch.manual_seed(0)  # the same dropout masks (GPT-2 and GPT-NeoX train with dropout)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(input_ids=ids, attention_mask=mask).logits
        return logits.float().square().mean()

    return run


def _grads(adapted: AdaptedModel) -> list[torch.Tensor]:
    return [p.grad.clone() for p in adapted.trainable_parameters()]


def _relative_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(float((x.float() - y.float()).norm()) ** 2 for x, y in zip(a, b, strict=True))
    den = sum(float(x.float().norm()) ** 2 for x in a)
    return (num / den) ** 0.5


@pytest.mark.parametrize("model_type", GROUPED)
def test_grouped_query_attention_keeps_unexpanded_heads_with_the_same_result(
    model_type: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Torch's fused kernel on unexpanded heads (the path past ``SHORT_KEYS``)."""
    monkeypatch.setattr(short_attention, "SHORT_KEYS", 0)
    expanded, grouped = _lora_emulator(model_type), _lora_emulator(model_type)
    assert use_gqa_attention(grouped.model)
    assert grouped.model.get_base_model().config._attn_implementation == IMPLEMENTATION
    expanded_bytes, expanded_loss = saved_bytes(_loss(expanded.model))
    grouped_bytes, grouped_loss = saved_bytes(_loss(grouped.model))
    expanded_loss.backward()
    grouped_loss.backward()
    torch.testing.assert_close(grouped_loss, expanded_loss, rtol=1e-6, atol=0)
    assert _relative_difference(_grads(expanded), _grads(grouped)) < 1e-5
    config = grouped.model.get_base_model().config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    copies = 2 * BATCH * config.num_attention_heads * LENGTH * head_dim * 4  # expanded k and v
    kept = 2 * BATCH * config.num_key_value_heads * LENGTH * head_dim * 4
    assert expanded_bytes - grouped_bytes == config.num_hidden_layers * (copies - kept)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("model_type", GROUPED)
def test_short_sequences_take_the_matmul_path_with_the_same_result(
    model_type: str, precision: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against transformers' attention in fp32; in bf16 against torch's fused kernel on the
    same heads, where the two differ only by rounding."""
    expanded, grouped = _lora_emulator(model_type), _lora_emulator(model_type)
    use_gqa_attention(grouped.model)
    if precision == "bf16":
        use_gqa_attention(expanded.model)
    calls = []
    hook = short_attention._ShortAttention.forward

    def counted(*args: object) -> torch.Tensor:
        calls.append(1)
        return hook(*args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(short_attention._ShortAttention, "forward", staticmethod(counted))
        grouped_loss = _loss(grouped.model, precision)()
    assert len(calls) == grouped.model.get_base_model().config.num_hidden_layers
    monkeypatch.setattr(short_attention, "SHORT_KEYS", 0)
    expanded_loss = _loss(expanded.model, precision)()
    expanded_loss.backward()
    grouped_loss.backward()
    if precision == "fp32":
        torch.testing.assert_close(grouped_loss, expanded_loss, rtol=1e-6, atol=0)
        assert _relative_difference(_grads(expanded), _grads(grouped)) < 1e-5
    else:
        torch.testing.assert_close(grouped_loss, expanded_loss, rtol=1e-2, atol=0)
        assert _relative_difference(_grads(expanded), _grads(grouped)) < 2e-2


@pytest.mark.parametrize("model_type", ["gpt2", "bert"])
def test_models_without_grouped_heads_keep_their_attention(model_type: str) -> None:
    model = tiny_model(model_type)
    before = model.config._attn_implementation
    assert not use_gqa_attention(model)
    assert model.config._attn_implementation == before


def test_eager_attention_is_left_alone() -> None:
    model = tiny_model("llama")
    model.set_attn_implementation("eager")
    assert not use_gqa_attention(model)
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("model_type", CAST_NORMS)
def test_norm_outputs_cast_once_keep_less_and_change_only_bf16_rounding(model_type: str) -> None:
    eager, cast = _lora_emulator(model_type), _lora_emulator(model_type)
    arch = cast.arch
    blocks = cast.model.get_base_model().config.num_hidden_layers
    assert cast_norm_outputs(cast.model, arch, cast.prefix) == 2 * blocks
    assert cast_norm_outputs(cast.model, arch, cast.prefix) == 0  # hooked once only
    assert set(cast.model.state_dict()) == set(eager.model.state_dict())
    eager_bytes, eager_loss = saved_bytes(_loss(eager.model, "bf16"))
    cast_bytes, cast_loss = saved_bytes(_loss(cast.model, "bf16"))
    eager_loss.backward()
    cast_loss.backward()
    assert torch.equal(cast_loss, eager_loss)  # the same cast, done once: same forward bits
    assert _relative_difference(_grads(eager), _grads(cast)) < 2e-2  # bf16 summation order
    if REGISTRY[model_type].gated_mlp:  # separate q, k, v (and gate, up): one copy per norm
        assert cast_bytes < eager_bytes
    else:  # fused qkv and one MLP input linear per norm: nothing to share, nothing added
        assert cast_bytes == eager_bytes


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_norm_casts_do_nothing_without_autocast(model_type: str) -> None:
    eager, cast = _lora_emulator(model_type), _lora_emulator(model_type)
    cast_norm_outputs(cast.model, cast.arch, cast.prefix)
    eager_loss, cast_loss = _loss(eager.model)(), _loss(cast.model)()
    eager_loss.backward()
    cast_loss.backward()
    assert torch.equal(cast_loss, eager_loss)
    assert all(torch.equal(a, b) for a, b in zip(_grads(eager), _grads(cast), strict=True))


def test_llama_lora_blocks_keep_one_input_copy_per_norm() -> None:
    """q, k, v share one bf16 copy of the attention norm's output, gate and up one of the MLP
    norm's: at least three copies fewer per LoRA block than a cast per linear (five)."""
    eager, cast = _lora_emulator("llama"), _lora_emulator("llama")
    cast_norm_outputs(cast.model, cast.arch, cast.prefix)
    eager_bytes, _ = saved_bytes(_loss(eager.model, "bf16"))
    cast_bytes, _ = saved_bytes(_loss(cast.model, "bf16"))
    config = cast.model.get_base_model().config
    lora_blocks = 2  # the bottom and top adapter blocks of the 1-2-1 plan
    one_copy = BATCH * LENGTH * config.hidden_size * 2  # bf16
    assert eager_bytes - cast_bytes >= lora_blocks * 3 * one_copy
