"""``PackedLinear``: a frozen linear on int8 / int4 weights for sparse fine-tuning.

Its autograd function returns the gradient with respect to the *input only*: the weights are
frozen, so no weight gradient is ever formed, and nothing is saved for backward — not the input
(only a weight gradient would need it) and not a dequantized weight (rows are dequantized again,
block by block, in backward). What stays in memory between forward and backward is the packed
weight the layer holds anyway.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from client.kernels.backends import KernelBackend, backend_for
from client.kernels.packed import PackedWeight, pack_layer
from emulator.layers import block_part
from emulator.quant import QuantLinear, QuantScheme, quantize_weight
from emulator.surgery import replace_module


class _PackedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: PackedLinear) -> torch.Tensor:
        weight = layer.packed
        backend = backend_for(weight.codes.device)
        rows = x.reshape(-1, x.shape[-1]).to(weight.dtype)
        out = backend.forward(rows, weight, backend.block_elements)  # divides by input_scale
        ctx.layer, ctx.backend, ctx.input_dtype = layer, backend, x.dtype
        ctx.input_shape = x.shape
        out_dtype = weight.dtype if torch.is_autocast_enabled(x.device.type) else x.dtype
        return out.reshape(*x.shape[:-1], weight.out_features).to(out_dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        weight: PackedWeight = ctx.layer.packed
        backend: KernelBackend = ctx.backend
        dy = grad_out.reshape(-1, weight.out_features).to(weight.dtype)
        dx = backend.backward(dy, weight, backend.block_elements)  # divides by input_scale
        return dx.reshape(ctx.input_shape).to(ctx.input_dtype), None


class PackedLinear(nn.Module):
    """Drop-in for a frozen ``QuantLinear`` with the fast kernels of ``client.kernels``."""

    # buffers (registered in __init__), the fields of ``PackedWeight``
    codes: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None
    input_scale: torch.Tensor | None
    bias: torch.Tensor | None
    fp32_scales: torch.Tensor | None
    fp32_inverse_input: torch.Tensor | None

    def __init__(self, packed: PackedWeight) -> None:
        super().__init__()
        self.in_features, self.out_features = packed.in_features, packed.out_features
        self.register_buffer("codes", packed.codes)
        self.register_buffer("scales", packed.scales)
        self.register_buffer("offsets", packed.offsets)
        self.register_buffer("input_scale", packed.input_scale)
        self.register_buffer("bias", packed.bias)
        # derived from the buffers above, so not part of the state dict
        self.register_buffer("fp32_scales", packed.fp32_scales, persistent=False)
        self.register_buffer("fp32_inverse_input", packed.fp32_inverse_input, persistent=False)

    @property
    def packed(self) -> PackedWeight:
        """The buffers as a ``PackedWeight`` (they follow ``.to(device)``)."""
        return PackedWeight(
            self.codes,
            self.scales,
            self.offsets,
            self.input_scale,
            self.bias,
            self.in_features,
            self.out_features,
            self.fp32_scales,
            self.fp32_inverse_input,
        )

    @classmethod
    def from_quant(cls, layer: QuantLinear, dtype: torch.dtype) -> PackedLinear:
        return cls(pack_layer(layer, dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = _PackedLinearFunction.apply(x, self)  # type: ignore[no-untyped-call]  # torch: apply is unannotated
        return out

    def extra_repr(self) -> str:
        bits = 8 if self.codes.dtype == torch.int8 else 4
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, int{bits}, "
            f"groups={self.scales.shape[1]}, dtype={self.scales.dtype}"
        )


def install_kernels(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every ``QuantLinear`` in ``model`` by a ``PackedLinear`` computing in ``dtype``."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    for name, layer in found:
        replace_module(model, name, PackedLinear.from_quant(layer, dtype))
    return len(found)


def is_lora_factor(name: str) -> bool:
    """Whether module ``name`` is a LoRA factor (PEFT's or ours: ``….lora_A.default``). A
    frozen factor (A under lora-fa) is part of the adapter, not of the frozen base: it stays
    in fp32 as the coordinator sent it, so an honest node's update of it is exactly zero."""
    return bool({"lora_A", "lora_B"} & set(name.split(".")))


def pack_frozen_block_linears(model: nn.Module, prefix: str, dtype: torch.dtype) -> int:
    """Quantize the frozen float ``nn.Linear`` layers inside the blocks under ``prefix`` (the
    adapter blocks' LoRA base layers, say) to per-channel int8 ``PackedLinear``s computing in
    ``dtype``; returns how many. Meant for an int8 emulator on a CPU with int8 dot products
    (``backends.integer_matmuls``), where it puts every frozen block linear on int8 × int8
    matmuls: the adapter's own frozen weights are then rounded as the emulator's are (LoRA
    trains against them as QLoRA trains against its quantized base; the plug-in uses the full
    model's). The head stays as it is: at a few answer rows its int8 kernel is the slower one.
    """
    found = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear
        and not module.weight.requires_grad
        and not is_lora_factor(name)
        and block_part(name, prefix) is not None
    ]
    scheme = QuantScheme("int8", awq=False)
    for name, module in found:
        weight = quantize_weight(module.weight, scheme)
        ones = torch.ones(module.in_features)
        layer = QuantLinear.from_weight(weight, ones, module.bias)
        replace_module(model, name, PackedLinear.from_quant(layer, dtype))
    return len(found)


def set_frozen_linear_weight(model: nn.Module, name: str, weight: torch.Tensor) -> None:
    """Give the frozen linear ``name`` of ``model`` a new weight, in the form it runs in: a
    float ``nn.Linear`` (or Conv1D) keeps its dtype, a ``PackedLinear``
    (``pack_frozen_block_linears``) is quantized again the same way (merge-exact rounds send
    new LoRA base weights)."""
    module = model.get_submodule(name)
    if isinstance(module, PackedLinear):
        scheme = QuantScheme("int8", awq=False)
        bias = None if module.bias is None else module.bias.float()
        layer = QuantLinear.from_weight(
            quantize_weight(weight.float(), scheme), torch.ones(module.in_features), bias
        )
        fresh = PackedLinear.from_quant(layer, module.scales.dtype)
        pairs = [(module._buffers.get(k), v) for k, v in fresh._buffers.items()]
        if all(
            (old is None) == (new is None)
            and (old is None or new is None or (old.shape, old.dtype) == (new.shape, new.dtype))
            for old, new in pairs
        ):
            # in place: the storages stay the ones the activation arena knows as weights
            with torch.no_grad():
                for old, new in pairs:
                    if old is not None and new is not None:
                        old.copy_(new)
        else:
            replace_module(model, name, fresh)
        return
    current = getattr(module, "weight", None)  # nn.Linear, or a GPT-2 style Conv1D
    if not isinstance(current, torch.Tensor) or current.requires_grad:
        raise ValueError(f"{name} is no frozen linear layer (it is {type(module).__name__})")
    if tuple(current.shape) != tuple(weight.shape):
        raise ValueError(f"{name} has a {tuple(current.shape)} weight, got {tuple(weight.shape)}")
    with torch.no_grad():
        current.copy_(weight.to(current.dtype))


def freeze_float_linears(model: nn.Module, dtype: torch.dtype) -> int:
    """Store the weights of frozen ``nn.Linear`` layers (LoRA factors aside) and of a frozen
    input embedding in ``dtype`` (bf16 compute needs no fp32 master copy of a weight that never
    changes); returns how many linears were converted.

    The embedding's lookups are cast back to its old dtype by a forward hook, so the residual
    stream keeps its precision (only the table's values are rounded). A head tied to the
    embedding shares the converted table: autocast would otherwise cast the fp32 table to bf16
    on every forward and keep that copy for backward.
    """
    _store_embedding(model, dtype)
    converted = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module.weight.requires_grad:
            continue
        if is_lora_factor(name):
            continue
        if module.weight.dtype != dtype:
            module.weight.data = module.weight.data.to(dtype)
            if module.bias is not None and not module.bias.requires_grad:
                module.bias.data = module.bias.data.to(dtype)
            converted += 1
    return converted


def _store_embedding(model: nn.Module, dtype: torch.dtype) -> None:
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    if not isinstance(embedding, nn.Embedding) or embedding.weight.requires_grad:
        return
    residual = embedding.weight.dtype
    if residual == dtype:
        return
    embedding.weight.data = embedding.weight.data.to(dtype)  # a tied head shares the Parameter
    embedding.register_forward_hook(lambda _module, _args, out: out.to(residual))
