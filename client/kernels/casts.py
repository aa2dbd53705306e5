"""Cast a pre-norm block's norm output to the autocast dtype once, not once per linear.

Under bf16 autocast the residual stream stays fp32, so each linear that reads a norm's output
casts it to bf16 itself: a SmolLM2 block casts the same tensor three times for q, k and v and
twice for gate and up (``_to_copy`` was ~5 % of a LoRA training step on the client). Where a
linear's input is needed for a weight gradient (LoRA's ``lora_A``, trainable linears) each of
those casts is also kept for backward, one copy per linear. A forward hook on the norms that
feed only linears (``ArchSpec.linear_input_norms``) casts once: the forward numbers are the same
bits (the same cast, done earlier). PEFT's LoRA layers in those blocks would cast the bf16 copy
back to their fp32 weight dtype before autocast casts it to bf16 again, so their input cast is
turned off (``cast_input_dtype_enabled``, PEFT's own switch): under autocast the LoRA matmul
sees the same bf16 values either way. In backward the gradients of the linears' inputs are summed
in bf16 before the single cast back instead of in fp32 after several, a bf16 rounding
difference (measured on a 2-6-2 SmolLM2 emulator: LoRA gradients within 0.5 % relative).

Without autocast (fp32 compute) the hook does nothing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from emulator.arch import ArchSpec
from emulator.layers import block_part


def _output_in_autocast_dtype(module: nn.Module, args: Any, output: Any) -> Any:
    """Forward hook: the output cast to the autocast dtype when autocast is on, else unchanged."""
    if not isinstance(output, torch.Tensor) or not output.is_floating_point():
        return None
    device_type = output.device.type
    if not torch.is_autocast_enabled(device_type):
        return None
    dtype = torch.get_autocast_dtype(device_type)
    return output.to(dtype) if output.dtype != dtype else None


def cast_norm_outputs(model: nn.Module, arch: ArchSpec, prefix: str) -> int:
    """Hook every ``arch.linear_input_norms`` norm of the blocks under ``prefix`` (the block
    list's state-dict prefix) to cast its output once under autocast, and let the blocks' LoRA
    layers take it as it comes; returns how many norms were hooked."""
    names = set(arch.linear_input_norms)
    if not names:
        return 0
    hooked = 0
    for name, module in model.named_modules():
        part = block_part(name, prefix)
        if part is None:
            continue
        if hasattr(module, "cast_input_dtype_enabled"):  # a PEFT tuner layer
            module.cast_input_dtype_enabled = False
        if part not in names:
            continue
        if getattr(module, "_offsite_casts_output", False):
            continue
        module.register_forward_hook(_output_in_autocast_dtype)
        module._offsite_casts_output = True
        hooked += 1
    return hooked
