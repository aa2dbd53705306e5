"""Shared fixtures: a tiny byte-level BPE tokenizer and tiny models built from configs.

Everything here is offline and takes seconds: no model or tokenizer is downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

if TYPE_CHECKING:
    from emulator.bundle import Bundle

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _test_session_folder(variable: str, prefix: str) -> None:
    """Point the cache ``variable`` at a folder of this test session's own (removed when the
    session ends), unless the caller chose one."""
    if variable not in os.environ:
        import atexit
        import shutil
        import tempfile

        folder = tempfile.mkdtemp(prefix=prefix)
        os.environ[variable] = folder
        atexit.register(shutil.rmtree, folder, ignore_errors=True)


# Full fine-tuning scores the tests compute are cached for this test session only, never in the
# user's $OFFSITE_HOME/baselines (coordinator/evaluation/baseline_cache.py); likewise the
# emulator bundles runs reuse (coordinator/workflow/bundle_cache.py) and the frozen tensors a
# host's workers share (client/shared_frozen.py).
_test_session_folder("OFFSITE_BASELINES", "offsite-test-baselines-")
_test_session_folder("OFFSITE_BUNDLES", "offsite-test-bundles-")
_test_session_folder("OFFSITE_FROZEN", "offsite-test-frozen-")

LABELS = ("business", "sport", "tech")
VOCAB = 384

_CORPUS = [
    "Shares rose as the market rallied and the company reported profit growth.",
    "The team won the match after a late goal in the second half of the cup final.",
    "A new phone and laptop were launched with faster chips and better software.",
    "Article: Text: Topic: Category: business sport tech politics entertainment",
    "The quick brown fox jumps over the lazy dog 0123456789.",
]


# The emulator settings of a plain layer drop (no factorization, no quantization, norms as they
# are): the defaults until the depth-preserving emulator became the default. Tests about layer
# drop, verbatim gates and quantization alone pin them.
LAYER_DROP: dict[str, object] = {"factorize": "none", "quantize": "none", "fold_norms": False}
LAYER_DROP_OVERRIDES = [
    "emulator.factorize='none'",
    "emulator.quantize='none'",
    "emulator.fold_norms=false",
]


def tiny_texts(label: str, n: int, seed: int = 0) -> list[str]:
    """Short synthetic texts whose words depend on the label (learnable, deterministic)."""
    import random

    words = {
        "business": "shares market profit company bank growth economy firm",
        "sport": "team match goal cup player coach season win",
        "tech": "phone laptop chip software internet data computer app",
    }[label].split()
    rng = random.Random(f"{label}-{seed}")
    return [" ".join(rng.choice(words) for _ in range(8)) for _ in range(n)]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = _CORPUS * 4 + [t for label in LABELS for t in tiny_texts(label, 20)]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<unk>", "<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>"
    )
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _tiny_configs() -> dict[str, Callable[[], object]]:
    import transformers as t

    decoder = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=6,
        num_attention_heads=4,
        max_position_embeddings=128,
    )
    return {
        "llama": lambda: t.LlamaConfig(**decoder, num_key_value_heads=2, tie_word_embeddings=True),
        "mistral": lambda: t.MistralConfig(**decoder, num_key_value_heads=2, sliding_window=None),
        "qwen2": lambda: t.Qwen2Config(**decoder, num_key_value_heads=2),
        "gemma3_text": lambda: t.Gemma3TextConfig(
            **decoder, num_key_value_heads=2, head_dim=8, sliding_window=4
        ),
        "gpt2": lambda: t.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=6, n_head=4, n_positions=128
        ),
        "opt": lambda: t.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=6,
            num_attention_heads=4,
            max_position_embeddings=128,
            word_embed_proj_dim=32,
        ),
        "bloom": lambda: t.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=6, n_head=4),
        "gpt_neox": lambda: t.GPTNeoXConfig(**decoder),
        "bert": lambda: t.BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=6,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=128,
        ),
    }


TINY_CONFIGS = _tiny_configs()


def saved_bytes(loss_fn: Callable[[], torch.Tensor]) -> tuple[int, torch.Tensor]:
    """Distinct bytes autograd saves while ``loss_fn`` runs forward, and the loss."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    return sum(seen.values()), loss


def tiny_model(model_type: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised 6-block model of ``model_type`` (fixed seed, eval mode)."""
    import transformers

    from emulator.arch import REGISTRY

    config = TINY_CONFIGS[model_type]()
    auto = getattr(transformers, REGISTRY[model_type].auto_class)
    torch.manual_seed(seed)
    return auto.from_config(config).eval()


def tiny_model_with_norms(model_type: str = "llama", scale: float = 0.01) -> torch.nn.Module:
    """``tiny_model`` whose norm weights differ from block to block (a random init's are all
    ones, so every block's would be the same tensor and verbatim checks could not see them)."""
    model = tiny_model(model_type)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(scale * torch.randn_like(p))
    return model


def write_public_text(folder: Path) -> Path:
    """A small public-text corpus (JSONL of completions) for calibration and distillation."""
    from offsite.data import Example, write_jsonl

    path = folder / "public.jsonl"
    texts = [t for lab in LABELS for t in tiny_texts(lab, 12, seed=5)]
    write_jsonl([Example("", completion=t) for t in texts], path)
    return path


def build_tiny_bundle(
    model: torch.nn.Module, tokenizer: object, folder: Path, keep: int, **settings: object
):
    """A 1-``keep``-1 LoRA bundle of a tiny 6-block ``model`` built in ``folder``, calibrated on
    ``write_public_text``; ``settings`` are ``EmulatorConfig`` fields. Returns (bundle, plan)."""
    from emulator.adapter import AdapterSpec
    from emulator.arch import arch_spec
    from emulator.build import build_bundle
    from emulator.layers import plan_layers
    from offsite.config import EmulatorConfig

    folder.mkdir(parents=True, exist_ok=True)
    arch = arch_spec(model.config)
    plan = plan_layers(6, 1, 1, keep)
    spec = AdapterSpec("lora", plan.adapter_layers, 4, 8, arch.lora_targets)
    config = EmulatorConfig(
        public_text=str(write_public_text(folder)),
        public_examples=4,
        calibration_examples=8,
        **settings,
    )
    bundle = build_bundle(
        model, tokenizer, arch, plan, spec, folder / "bundle", source="tiny", settings=config
    )
    return bundle, plan


def model_outputs(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits for LMs, last hidden states for encoders."""
    with torch.no_grad():
        out = model(input_ids=input_ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture()
def tiny_llama_dir(tmp_path: Path, tokenizer) -> Path:
    """A tiny llama saved in the Hugging Face layout, with the tiny tokenizer."""
    model = tiny_model("llama")
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_bundle(model_dir: Path, folder: Path, kind: str = "lora") -> Bundle:
    """The simulation tests' bundle of a tiny model: a 1-2-1 split of its 6 blocks (two middle
    blocks kept), adapter ``kind`` at rank 4 / alpha 8 on the architecture's LoRA targets."""
    from coordinator.models import load_full_model
    from emulator.adapter import AdapterSpec
    from emulator.bundle import write_bundle
    from emulator.layers import plan_layers

    model, tokenizer, arch, _ = load_full_model(str(model_dir))
    plan = plan_layers(6, 1, 1, 2)
    spec = AdapterSpec(kind, plan.adapter_layers, 4, 8, arch.lora_targets)
    return write_bundle(model, tokenizer, plan, spec, folder, source="tiny")
