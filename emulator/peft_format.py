"""Write a trained LoRA adapter as a standard PEFT adapter folder for the *full* model.

No model is loaded: the adapter tensors already carry full-model block numbering, so the folder
is ``adapter_config.json`` (LoRA on the adapter blocks via ``layers_to_transform``) plus
``adapter_model.safetensors`` with PEFT's key names. ``PeftModel.from_pretrained(full, dir)``,
vLLM ``--lora-modules`` and ``offsite serve`` load it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from emulator.adapter import AdapterSpec
from emulator.arch import ArchSpec


def peft_key(name: str) -> str:
    """PEFT saves adapter weights without the adapter name (``lora_A.default.weight``)."""
    return name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


def write_peft_adapter(
    state: Mapping[str, torch.Tensor],
    spec: AdapterSpec,
    arch: ArchSpec,
    base_model: str,
    out_dir: Path,
) -> Path:
    """Write ``state`` (LoRA tensors, full-model names) as a PEFT adapter into ``out_dir``."""
    from peft import LoraConfig

    if not spec.policy.lora:
        raise ValueError(f"only LoRA adapters have a PEFT form (this one is {spec.kind!r})")
    out_dir.mkdir(parents=True, exist_ok=True)
    config = LoraConfig(
        r=spec.lora_r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=0.0,
        target_modules=list(spec.lora_targets or arch.lora_targets),
        layers_to_transform=list(spec.trained_layers),
        layers_pattern=arch.layers_pattern,
        fan_in_fan_out=arch.lora_fan_in_fan_out,
        task_type="CAUSAL_LM" if arch.causal_lm else None,
        base_model_name_or_path=base_model,
    )
    config.save_pretrained(str(out_dir))
    tensors = {
        peft_key(k): v.detach().to(torch.float32).contiguous().cpu() for k, v in state.items()
    }
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out_dir
