"""LoRA on the lean decoder with PEFT's module tree, parameter names and arithmetic, without PEFT.

The adapter travels between client and coordinator as a state dict keyed by PEFT's names
(``base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight``), and the
coordinator, which runs PEFT, aggregates and exports it. ``wrap_lora`` builds the same tree
around a ``LeanCausalLM``: ``LoraWrapper.base_model.model`` is the model and every targeted
linear becomes a ``LoraLinear`` holding the original as ``base_layer`` beside ``lora_A`` /
``lora_B`` ``ModuleDict``s under the ``default`` adapter name. The forward computes PEFT's
``base_layer(x) + lora_B(lora_A(x)) * alpha / r`` (no dropout), the result in the base
layer's dtype, with the last product, scale and sum as one accumulating matmul;
initialisation is PEFT's default (Kaiming-uniform A, zero B).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from emulator.layers import block_index
from emulator.surgery import replace_module

if TYPE_CHECKING:
    from client.runtime.decoder import LeanCausalLM

ADAPTER_NAME = "default"


class LoraLinear(nn.Module):
    def __init__(self, base_layer: nn.Linear, r: int, alpha: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        lora_a = nn.Linear(base_layer.in_features, r, bias=False)
        self.lora_A = nn.ModuleDict({ADAPTER_NAME: lora_a})
        lora_b = nn.Linear(r, base_layer.out_features, bias=False)
        self.lora_B = nn.ModuleDict({ADAPTER_NAME: lora_b})
        self.scaling = alpha / r
        # PEFT's switch (``client.kernels.casts`` turns it off under autocast): cast the input
        # to the LoRA weights' dtype first
        self.cast_input_dtype_enabled = True
        nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(lora_b.weight)

    @property
    def in_features(self) -> int:
        return int(self.base_layer.in_features)

    @property
    def out_features(self) -> int:
        return int(self.base_layer.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.base_layer(x)
        dtype = result.dtype
        # the adapter's two nn.Linear layers (ModuleDict values are typed as any module)
        lora_a = cast(nn.Linear, self.lora_A[ADAPTER_NAME])
        lora_b = cast(nn.Linear, self.lora_B[ADAPTER_NAME])
        if self.cast_input_dtype_enabled:
            x = x.to(lora_a.weight.dtype)
        hidden: torch.Tensor = lora_a(x)
        weight = lora_b.weight
        if hidden.dtype != result.dtype and not torch.is_autocast_enabled(x.device.type):
            update: torch.Tensor = lora_b(hidden)
            return (result + update * self.scaling).to(dtype)
        # result + scaling · hidden Bᵀ as one matmul that accumulates into the base output: the
        # scale and the add ride in the GEMM instead of two passes over the output (and two
        # more in backward), one rounding instead of three
        folded = torch.addmm(
            result.reshape(-1, result.shape[-1]),
            hidden.reshape(-1, hidden.shape[-1]),
            weight.t(),
            alpha=self.scaling,
        )
        return folded.view(result.shape).to(dtype)


class _Tuner(nn.Module):
    """PEFT's ``LoraModel`` position in the tree: holds the model as ``model``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


class LoraWrapper(nn.Module):
    """PEFT's ``PeftModel`` position in the tree: ``base_model.model`` is the wrapped model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.base_model = _Tuner(model)

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    def get_input_embeddings(self) -> nn.Module:
        model = cast("LeanCausalLM", self.base_model.model)  # what wrap_lora wraps
        return model.get_input_embeddings()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model.model(*args, **kwargs)


def wrap_lora(
    model: nn.Module,
    prefix: str,
    layers: Sequence[int],
    targets: Sequence[str],
    r: int,
    alpha: int,
    seed: int = 0,
) -> LoraWrapper:
    """LoRA on every linear named in ``targets`` inside blocks ``layers`` of the block list at
    state-dict prefix ``prefix``; everything else stays as it is (frozen by the caller)."""
    chosen = set(layers)
    found = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and name.rsplit(".", 1)[-1] in targets
        and block_index(name, prefix) in chosen
    ]
    if not found:
        raise ValueError(f"no LoRA target {list(targets)} in blocks {sorted(chosen)} of {prefix}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in found:
            base = model.get_submodule(name)
            assert isinstance(base, nn.Linear)  # as found above
            lora = LoraLinear(base, r, alpha).to(base.weight.device)
            replace_module(model, name, lora)
    return LoraWrapper(model)
