"""client.runtime: the lean decoder, LoRA, tokenizer and optimizer against transformers, PEFT,
AutoTokenizer and torch.optim, and a client process that imports none of the heavy stacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from client.runtime.decoder import LeanCausalLM, lean_config
from client.runtime.tokenizer import lean_tokenizer
from client.session import load_client_model, load_client_tokenizer, load_for_training
from emulator.adapter import AdapterSpec
from emulator.arch import REGISTRY
from emulator.batches import Batch
from emulator.build import build_bundle
from emulator.bundle import verify_bundle
from emulator.examples import training_batches
from emulator.forward import answer_loss, autocast
from emulator.layers import plan_layers
from emulator.optim import AdamW
from offsite.config import EmulatorConfig
from offsite.data import Example
from offsite.errors import IntegrityError, ModelError
from tests.conftest import LABELS, TINY_CONFIGS, VOCAB, tiny_model, tiny_texts, write_public_text

ROOT = Path(__file__).resolve().parents[2]


def _windowed(model_type: str) -> object:
    """A config of ``model_type`` whose layers attend through a 5-token sliding window."""
    config = TINY_CONFIGS[model_type]()
    if model_type == "mistral":
        config.sliding_window = 5
    if model_type == "qwen2":
        import transformers

        config = transformers.Qwen2Config(
            **{k: getattr(config, k) for k in ("vocab_size", "hidden_size", "intermediate_size")},
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
            use_sliding_window=True,
            sliding_window=5,
            max_window_layers=3,
        )
    return config


def _pair(config: object) -> tuple[torch.nn.Module, LeanCausalLM]:
    """A transformers model from ``config`` (random, seeded) and the lean one with its weights."""
    import transformers

    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(config).eval()
    lean_cfg, why = lean_config(reference.config.to_dict())
    assert lean_cfg is not None, why
    lean = LeanCausalLM(lean_cfg)
    result = lean.load_state_dict(reference.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert set(result.missing_keys) <= {"lm_head.weight"}
    lean.tie_weights()
    return reference, lean.eval()


def _left_padded(length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, : length // 2] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


LEAN_FAMILIES = sorted(name for name, spec in REGISTRY.items() if spec.lean_decoder is not None)
CASES = [(t, False) for t in LEAN_FAMILIES] + [("mistral", True), ("qwen2", True)]


@pytest.mark.parametrize("length", [24, 200], ids=["short-kernel", "sdpa"])
@pytest.mark.parametrize(("model_type", "windowed"), CASES)
def test_lean_decoder_computes_what_transformers_computes(
    model_type: str, windowed: bool, length: int
) -> None:
    config = _windowed(model_type) if windowed else TINY_CONFIGS[model_type]()
    reference, lean = _pair(config)
    ids, mask, positions = _left_padded(length)
    real = mask.bool()
    kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    expected = reference(**kwargs, use_cache=False).logits
    got = lean(**kwargs).logits
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)

    for model in (reference, lean):
        model.zero_grad()
        out = model(**kwargs).logits
        (out[real].float().pow(2).mean()).backward()
    grads = dict(lean.named_parameters())
    for name, param in reference.named_parameters():
        if name in grads:
            torch.testing.assert_close(grads[name].grad, param.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("length", [24, 200], ids=["short-kernel", "sdpa"])
def test_the_last_block_computes_only_the_kept_positions(length: int) -> None:
    """With ``logits_to_keep``, the last block's queries, MLP and residual cover the kept
    positions only; logits and every gradient are those of the whole sequence's forward."""
    _, lean = _pair(TINY_CONFIGS["llama"]())
    ids, mask, positions = _left_padded(length)
    keep = 5
    rows: list[int] = []
    lean.model.layers[-1].mlp.register_forward_pre_hook(
        lambda _m, args: rows.append(args[0].shape[1])
    )
    kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    runs = []
    for logits_to_keep in (0, keep):
        lean.zero_grad()
        logits = lean(**kwargs, logits_to_keep=logits_to_keep).logits[:, -keep:]
        logits.float().pow(2).mean().backward()
        runs.append((logits.detach(), {n: p.grad.clone() for n, p in lean.named_parameters()}))
    assert rows == [length, keep]
    (full, full_grads), (kept, kept_grads) = runs
    torch.testing.assert_close(kept, full, rtol=1e-6, atol=1e-6)
    for name, grad in full_grads.items():
        torch.testing.assert_close(kept_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_lean_lora_computes_what_peft_computes_with_trained_weights(precision: str) -> None:
    """LoRA with nonzero B (as after training): logits and LoRA gradients as PEFT's, in fp32
    to 1e-5, in bf16 no further from fp32 than PEFT's own bf16 (the lean LoRA folds scale and
    sum into one matmul, so it rounds less)."""
    from peft import LoraConfig, get_peft_model

    from client.runtime.lora import wrap_lora

    reference, lean = _pair(TINY_CONFIGS["llama"]())
    targets = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets)
    config.layers_to_transform, config.layers_pattern = [0, 1], "layers"
    peft_model = get_peft_model(reference, config)
    lean_model = wrap_lora(lean, "model.layers", [0, 1], targets, r=4, alpha=8)
    generator = torch.Generator().manual_seed(1)
    trained = {
        n: torch.randn(p.shape, generator=generator) * 0.2
        for n, p in peft_model.named_parameters()
        if "lora_" in n
    }
    for model in (peft_model, lean_model):
        missing = model.load_state_dict(trained, strict=False)
        assert not missing.unexpected_keys
    ids, mask, positions = _left_padded(24)
    real = mask.bool()
    kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}

    def run(model: torch.nn.Module, dtype: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        with autocast(dtype, torch.device("cpu")):
            logits = model(**kwargs).logits[real].float()
        logits.pow(2).mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}
        return logits.detach(), grads

    want_logits, want_grads = run(peft_model, "fp32")
    got_logits, got_grads = run(lean_model, precision)
    assert got_grads.keys() == want_grads.keys() == trained.keys()
    if precision == "fp32":
        torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
        for name, grad in want_grads.items():
            torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
        return
    peft_logits, _ = run(peft_model, "bf16")
    ours = (got_logits - want_logits).norm() / want_logits.norm()
    theirs = (peft_logits - want_logits).norm() / want_logits.norm()
    assert ours <= 1.1 * theirs, (ours.item(), theirs.item())
    assert ours < 2e-2


def test_configs_the_lean_decoder_does_not_compute_say_why() -> None:
    base = TINY_CONFIGS["llama"]().to_dict()
    scaled = {**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}}
    cases = {
        "gpt2": ({**base, "model_type": "gpt2"}, "lean-runtime family"),
        "rope": (scaled, "rotary scaling"),
        "act": ({**base, "hidden_act": "relu"}, "activation 'relu'"),
        "tp": ({**base, "pretraining_tp": 2}, "pretraining_tp"),
    }
    for config, reason in cases.values():
        lean, why = lean_config(config)
        assert lean is None and reason in why


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> dict[str, Path]:
    """Tiny llama bundles, 1-2-1 of 6 blocks: full precision, int8 and int4, and with the middle
    linears SVD-factorized (float and int8 factors)."""
    from emulator.arch import arch_spec

    out = {}
    root = tmp_path_factory.mktemp("lean-bundles")
    full = tiny_model("llama")
    arch = arch_spec(full.config)
    plan = plan_layers(6, 1, 1, 2)
    spec = AdapterSpec("lora", plan.adapter_layers, 4, 8, arch.lora_targets, tuple(plan.top))
    for scheme in ("none", "int8", "int4", "svd", "svd-int8"):
        settings = EmulatorConfig(
            public_text=str(write_public_text(root)),
            public_examples=4,
            calibration_examples=8,
            quantize=scheme.removeprefix("svd-") if scheme != "svd" else "none",
            quant_group_size=16,
            factorize="svd" if scheme.startswith("svd") else "none",
            factorize_rank_multiple=4,
        )
        bundle = build_bundle(
            full, tokenizer, arch, plan, spec, root / scheme, source="tiny", settings=settings
        )
        out[scheme] = bundle.path
    return out


def _batch(tokenizer) -> Batch:
    examples = [Example(t, label=lab) for lab in LABELS for t in tiny_texts(lab, 4)]
    return next(
        training_batches(
            tokenizer, examples, "{text}\nTopic:", max_words=8, max_length=40, batch_size=6, seed=0
        )
    )


@pytest.mark.parametrize("policy", ["lora", "sparse"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("scheme", ["none", "int8", "int4", "svd", "svd-int8"])
def test_client_trains_the_same_numbers_on_either_runtime(
    bundles: dict[str, Path], scheme: str, precision: str, policy: str
) -> None:
    """Loss and trainable names of one step are the same bits on the lean runtime (LoRA without
    PEFT) and on transformers (LoRA through PEFT); gradients agree to rounding (the lean last
    block sums over the answer rows only: measured 1.8e-7 of the gradient's scale in fp32,
    5.5e-3 in bf16, whose unit roundoff is 2⁻⁸)."""
    bundle = verify_bundle(bundles[scheme])
    batch = _batch(load_client_tokenizer(bundle))
    runs = {}
    for runtime in ("transformers", "lean"):
        adapted, converted = load_for_training(bundle, precision, policy=policy, runtime=runtime)
        assert converted["lean_runtime"] == (runtime == "lean")
        adapted.model.train()
        with autocast(precision, torch.device("cpu")):
            loss = answer_loss(adapted.model, batch)
        loss.backward()
        grads = {n: p.grad for n, p in adapted.model.named_parameters() if p.requires_grad}
        runs[runtime] = (loss, grads, adapted.trainable_state())
    (loss_t, grads_t, state_t), (loss_l, grads_l, state_l) = runs["transformers"], runs["lean"]
    assert torch.equal(loss_l, loss_t)
    assert list(grads_l) == list(grads_t)
    assert any(g.abs().sum() > 0 for g in grads_l.values())
    bound = 1e-6 if precision == "fp32" else 2**-6
    for name, grad in grads_t.items():
        error = (grads_l[name] - grad).abs().max()
        assert error <= bound * grad.abs().max(), (name, error.item())
    assert state_l.keys() == state_t.keys()  # the adapter on the wire has PEFT's names


@pytest.mark.parametrize("scheme", ["none", "int8", "int4", "svd", "svd-int8"])
def test_nothing_of_the_bundle_files_stays_mapped_after_loading(
    bundles: dict[str, Path], scheme: str
) -> None:
    """Tensors are read through a memory map and copied; a view left on the map (a packed
    buffer once did) would keep every touched page of the file resident beside the copy."""
    import gc

    bundle = verify_bundle(bundles[scheme])
    adapted, _ = load_for_training(bundle, "bf16", runtime="lean")
    gc.collect()
    maps = Path("/proc/self/maps").read_text()
    assert str(bundle.path) not in maps
    assert adapted.trainable_parameters()


def test_a_bundle_whose_tensors_do_not_fit_is_refused(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    from emulator.bundle import ADAPTER_FILE

    copy = tmp_path / "copy"
    shutil.copytree(bundles["none"], copy)
    bundle = verify_bundle(copy)
    tensors = load_file(str(copy / ADAPTER_FILE))
    tensors.pop(next(iter(tensors)))
    save_file(tensors, str(copy / ADAPTER_FILE))  # after verification: the loader's own check
    with pytest.raises(IntegrityError, match="missing"):
        load_client_model(bundle, "lean")


def test_lean_runtime_asked_for_a_family_it_does_not_cover_says_why(
    tokenizer, tmp_path: Path
) -> None:
    from emulator.arch import arch_spec
    from emulator.bundle import write_bundle

    full = tiny_model("gpt2")
    arch = arch_spec(full.config)
    plan = plan_layers(6, 1, 1, 2)
    spec = AdapterSpec.for_plan("lora", plan, arch)
    bundle = write_bundle(full, tokenizer, plan, spec, tmp_path / "b", source="tiny")
    with pytest.raises(ModelError, match="gpt2"):
        load_client_model(bundle, "lean")
    model, lora = load_client_model(bundle, "auto")  # falls back to transformers
    assert lora is None and type(model).__name__ == "GPT2LMHeadModel"


def test_lean_tokenizer_encodes_what_auto_tokenizer_encodes(tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(tokenizer_dir)
    lean = lean_tokenizer(tokenizer_dir)
    assert lean is not None
    texts = ["", "hello world", "  spaces  and\nnewlines\t", "ünïcödé 123", *tiny_texts("tech", 5)]
    for text in texts:
        for special in (True, False):
            assert (
                lean(text, add_special_tokens=special)["input_ids"]
                == reference(text, add_special_tokens=special)["input_ids"]
            )
    assert (lean.pad_token_id, lean.eos_token_id) == (
        reference.pad_token_id,
        reference.eos_token_id,
    )


def test_tokenizer_configs_transformers_would_rewrite_stay_on_auto_tokenizer(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    import shutil

    for change in ({"add_bos_token": True}, {"tokenizer_class": "LlamaTokenizer"}):
        folder = tmp_path / next(iter(change))
        shutil.copytree(tokenizer_dir, folder)
        config_path = folder / "tokenizer_config.json"
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **change}))
        assert lean_tokenizer(folder) is None


def test_adamw_is_torch_adamw_bit_for_bit() -> None:
    generator = torch.Generator().manual_seed(0)
    shapes = [(16, 8), (8,), (3, 5, 7)]
    start = [torch.randn(s, generator=generator) for s in shapes]
    grads = [[torch.randn(s, generator=generator) for s in shapes] for _ in range(6)]
    ours = [t.clone().requires_grad_(True) for t in start]
    theirs = [t.clone().requires_grad_(True) for t in start]
    mine = AdamW(ours, lr=3e-3, weight_decay=0.1)
    reference = torch.optim.AdamW(theirs, lr=3e-3, weight_decay=0.1)
    for step_grads in grads:
        for params in (ours, theirs):
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.clone()
        mine.step()
        reference.step()
        mine.zero_grad()
        reference.zero_grad()
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
        assert a.grad is None


_CLIENT_PROCESS = """
import json, sys, torch
from client.session import load_client_tokenizer, load_for_training
from emulator.bundle import verify_bundle
from emulator.examples import training_batches
from emulator.train import train_adapter
from offsite.data import Example
bundle = verify_bundle(sys.argv[1])
adapted, converted = load_for_training(bundle, "bf16")
tokenizer = load_client_tokenizer(bundle)
examples = [Example(f"text number {i} about things", label=["a", "b"][i % 2]) for i in range(8)]
batches = training_batches(tokenizer, examples, "{text}\\nTopic:", max_words=8, max_length=32,
                           batch_size=4, seed=0)
result = train_adapter(adapted, batches, steps=2, lr=1e-3, precision="bf16",
                       device=torch.device("cpu"))
heavy = ["transformers", "peft", "torch._dynamo", "sympy", "scipy"]
print(json.dumps({"loaded": sorted(m for m in heavy if m in sys.modules),
                  "lean": converted["lean_runtime"], "losses": result.losses}))
"""


def test_a_client_trains_without_importing_the_heavy_stacks(bundles: dict[str, Path]) -> None:
    """transformers, PEFT, torch's compiler and sympy stay out of a client's process (~150 MB
    resident on SmolLM2, see client.runtime)."""
    done = subprocess.run(
        [sys.executable, "-c", _CLIENT_PROCESS, str(bundles["int8"])],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["lean"] == 1
    assert report["loaded"] == []
    assert len(report["losses"]) == 2 and all(v == v for v in report["losses"])


@pytest.mark.parametrize("runtime", ["lean", "transformers"])
def test_an_int8_emulator_puts_the_adapters_frozen_linears_on_int8_too(
    bundles: dict[str, Path], runtime: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a CPU with int8 dot products, an int8 bundle in bf16 compute runs every frozen block
    linear int8 × int8: the LoRA bases of the adapter blocks are packed at load (the head is
    not); fp32 compute, int4 and full-precision bundles, and CPUs without int8 dot products
    keep them as they were."""
    from client.kernels import PackedLinear, backends

    def bases(scheme: str, precision: str) -> list[type]:
        adapted, _ = load_for_training(
            verify_bundle(bundles[scheme]), precision, policy="lora", runtime=runtime
        )
        names = dict(adapted.model.named_modules())
        found = [type(m) for n, m in names.items() if n.endswith("base_layer")]
        head = [m for n, m in names.items() if n.endswith("lm_head")]
        assert found and len(head) == 1 and not isinstance(head[0], PackedLinear)
        return found

    monkeypatch.setattr(backends, "cpu_has_int8_dot", lambda: True)
    assert set(bases("int8", "bf16")) == {PackedLinear}
    for scheme, precision in (("int8", "fp32"), ("int4", "bf16"), ("none", "bf16")):
        assert PackedLinear not in bases(scheme, precision), (scheme, precision)
    monkeypatch.setattr(backends, "cpu_has_int8_dot", lambda: False)
    assert PackedLinear not in bases("int8", "bf16")
