"""Load the model owner's full model and tokenizer from a catalog name, directory or cached id."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from emulator.arch import ArchSpec, arch_spec
from offsite.catalog import resolve_model
from offsite.errors import ModelError


def _read_config(name: str) -> tuple[Path | str, Any]:
    from transformers import AutoConfig

    path = resolve_model(name)
    try:
        return path, AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot read the config of {name!r} at {path}: {err}") from err


def check_model(name: str) -> tuple[ArchSpec, int]:
    """Resolve ``name``; check its architecture without loading weights; (spec, block count)."""
    _, config = _read_config(name)
    arch = arch_spec(config)
    if not arch.causal_lm:
        raise ModelError(
            f"{name} is a {arch.model_type} encoder; federated runs score answers with a causal "
            "LM. Use a decoder model (e.g. smollm2-135m)"
        )
    return arch, int(config.num_hidden_layers)


def load_full_model(name: str) -> tuple[nn.Module, Any, ArchSpec, Path | str]:
    """(model, tokenizer, arch spec, path); the architecture is checked before weights load."""
    import transformers
    from transformers import AutoTokenizer

    path, config = _read_config(name)
    arch = arch_spec(config)
    auto = getattr(transformers, arch.auto_class)
    try:  # safetensors only: a pickle checkpoint can run code when loaded
        model = auto.from_pretrained(path, dtype=torch.float32, use_safetensors=True).eval()
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load the weights of {name!r} at {path}: {err}") from err
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer, arch, path
