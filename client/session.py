"""A data owner's training session: a verified bundle loaded once, reused across rounds.

Flower keeps simulation workers (Ray actors) alive across rounds, so the emulator is loaded once
per worker process and cached by bundle digest and precision; each round only swaps in the
global adapter.

Loading prepares the frozen part for training (``prepare_frozen``): quantized middle linears
move onto the packed kernels of ``client.kernels`` and, with bf16 compute, frozen float linears
are stored in bf16 (autocast would cast them to bf16 on every use anyway, so the numbers do not
change; the fp32 copy is simply never kept).
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from client.kernels import PackedLinear, freeze_float_linears, install_kernels
from client.kernels.arena import ActivationArena
from client.kernels.attention import use_gqa_attention
from client.kernels.backends import integer_matmuls
from client.kernels.casts import cast_norm_outputs
from client.kernels.lean import lean_gated_mlps
from client.kernels.linear import pack_frozen_block_linears
from client.kernels.rms_norm import lean_rms_norms
from client.shared_frozen import share_frozen
from emulator.adapter import AdaptedModel, AdapterSpec, LoraWrap, attach_adapter
from emulator.arch import hf_model
from emulator.bundle import (
    Bundle,
    bundle_arch,
    load_bundle_model,
    load_bundle_tokenizer,
    verify_bundle,
)
from emulator.forward import pick_device, resolve_precision
from emulator.tokenizers import Tokenizer
from offsite.errors import ModelError
from offsite.host.memory import trim_allocator

log = logging.getLogger(__name__)

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Session:
    bundle: Bundle
    adapted: AdaptedModel
    tokenizer: Tokenizer
    device: torch.device
    precision: str  # resolved: "fp32" | "bf16"
    memory: dict[str, Any]  # ``train_adapter`` keywords: how steps hold memory (training_memory)
    shared_bytes: int = 0  # frozen tensors mapped from the host's shared copy (shared_frozen)


# (bundle digest, precision, checkpointing, LoRA rank (0: the bundle's), merge-exact)
_SESSIONS: dict[tuple[str, str, bool, int, bool], Session] = {}


def _integer_emulator(model: nn.Module) -> bool:
    """Whether the emulator's linears run int8 × int8 here (``backends.integer_matmuls``)."""
    return any(
        isinstance(module, PackedLinear) and integer_matmuls(module.packed)
        for module in model.modules()
    )


def prepare_frozen(adapted: AdaptedModel, precision: str) -> dict[str, int]:
    """Put the model's frozen linears on the fast path for ``precision`` (with an int8
    emulator on a CPU with int8 dot products, the adapter blocks' frozen linears in int8 too),
    its gated MLPs on the lean autograd of ``client.kernels.lean``, Llama-style RMS norms on
    ``client.kernels.rms_norm`` (half the bytes kept for backward), grouped-query attention
    on unexpanded key/value heads (``client.kernels.attention``) and pre-norm outputs cast
    once under autocast (``client.kernels.casts``); call after the adapter is attached, so
    trainable tensors are known. Returns what was converted.

    Tensors loaded from a memory-mapped checkpoint are copied into process memory and the
    mapping dropped: otherwise every page of the file that a conversion touched stays
    resident beside the converted copy.
    """
    model, dtype = adapted.model, COMPUTE_DTYPES[precision]
    packed = install_kernels(model, dtype)
    if _integer_emulator(model):  # every frozen block linear on int8 × int8, the adapter's too
        packed += pack_frozen_block_linears(model, adapted.prefix, dtype)
    cast = freeze_float_linears(model, dtype) if dtype != torch.float32 else 0
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.clone()
        # new buffer objects, not new data under old ones: a view keeps its base alive
        copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # shared buffers stay shared
        for module in model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    if id(buffer) not in copies:
                        copies[id(buffer)] = (buffer, buffer.clone())
                    module._buffers[name] = copies[id(buffer)][1]
    lean = lean_gated_mlps(model, adapted.arch, adapted.prefix)
    rms = lean_rms_norms(model)
    norms = cast_norm_outputs(model, adapted.arch, adapted.prefix)
    gqa = use_gqa_attention(model)
    release_freed_memory()
    return {
        "packed_linears": packed,
        "bf16_linears": cast,
        "lean_mlps": lean,
        "lean_norms": rms,
        "cast_norms": norms,
        "gqa_attention": int(gqa),
    }


def training_memory(
    adapted: AdaptedModel, checkpointing: bool, device: torch.device | None = None
) -> dict[str, Any]:
    """``train_adapter`` keywords for how a client's steps hold memory on CPU: saved
    activations in an ``ActivationArena`` instead of trimming the heap after every step (the
    same peak without re-faulting the trimmed pages: ``client.kernels.arena``). With activation
    checkpointing the blocks' inputs go there and each block's recomputation keeps its own
    saved-tensor hooks (innermost hooks win), so ``checkpointing`` changes nothing here. CUDA's
    caching allocator needs neither."""
    if device is not None and device.type != "cpu":
        return {}
    arena = ActivationArena([*adapted.model.parameters(), *adapted.model.buffers()])
    return {"saved_tensors": arena.step}


def enable_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward instead of keeping them."""
    unwrap = getattr(model, "get_base_model", None)  # a PEFT wrapper's
    base = unwrap() if callable(unwrap) else model
    hf_model(base).gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False}
    )


def release_freed_memory() -> None:
    """Hand memory freed by Python and torch back to the OS (glibc keeps it otherwise)."""
    gc.collect()
    trim_allocator()


RUNTIMES = ("auto", "lean", "transformers")


def load_client_model(bundle: Bundle, runtime: str = "auto") -> tuple[nn.Module, LoraWrap | None]:
    """The bundle's emulator on the lean runtime (``client.runtime``) where its family and
    config allow (``runtime="auto"``), else through transformers; also the LoRA wrapper that
    goes with it (None: PEFT's)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown client runtime {runtime!r}; use one of {RUNTIMES}")
    if runtime != "transformers":
        from client.runtime.load import bundle_lean_config, load_lean_model
        from client.runtime.lora import wrap_lora

        config, why = bundle_lean_config(bundle)
        if config is not None:
            return load_lean_model(bundle, config), wrap_lora
        if runtime == "lean":
            raise ModelError(f"the lean client runtime cannot run this bundle: {why}")
        log.info("lean client runtime not used (%s): loading through transformers", why)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return load_bundle_model(bundle), None


def load_client_tokenizer(bundle: Bundle) -> Any:
    """The bundle's tokenizer on ``tokenizers`` alone where that encodes identically, else
    ``AutoTokenizer``."""
    from client.runtime.tokenizer import lean_tokenizer

    return lean_tokenizer(bundle.path) or load_bundle_tokenizer(bundle)


def load_for_training(
    bundle: Bundle,
    precision: str,
    *,
    policy: str | None = None,
    checkpointing: bool = False,
    device: torch.device | None = None,
    runtime: str = "auto",
    lora_rank: int = 0,
) -> tuple[AdaptedModel, dict[str, int]]:
    """The bundle's emulator on ``device`` with its adapter attached (``policy`` instead of the
    bundle's own, for planning and benchmarks), the frozen part prepared for ``precision`` and
    activation checkpointing if asked; also what ``prepare_frozen`` converted. ``runtime``
    picks the model code (``load_client_model``); ``lora_rank`` > 0 trains LoRA at that rank
    instead of the bundle's (heterogeneous ranks under merge-exact aggregation)."""
    model, lora = load_client_model(bundle, runtime)
    model = model.to(device or torch.device("cpu"))
    arch = bundle_arch(bundle)
    spec = bundle.adapter if policy is None else AdapterSpec.for_plan(policy, bundle.plan, arch)
    if lora_rank:
        spec = replace(spec, lora_r=lora_rank)
    adapted = attach_adapter(model, arch, spec, bundle.plan.emulator_to_full(), lora=lora)
    converted = prepare_frozen(adapted, precision)
    converted["lean_runtime"] = int(lora is not None)
    if checkpointing:
        enable_checkpointing(adapted.model)
    return adapted, converted


def open_session(
    bundle_path: Path | str,
    digest: str,
    precision: str = "auto",
    checkpointing: bool = False,
    *,
    lora_rank: int = 0,
    merge_exact: bool = False,
) -> Session:
    """Verify and load the bundle ``digest`` for training in ``precision``, with activation
    checkpointing if asked (once per process). ``lora_rank`` > 0: LoRA at that rank;
    ``merge_exact``: a session whose LoRA base weights each round replaces (never shared with
    a session that trains on the bundle's own base weights)."""
    device = pick_device()
    resolved = resolve_precision(precision, device)
    key = (digest, resolved, checkpointing, lora_rank, merge_exact)
    if key in _SESSIONS:
        return _SESSIONS[key]
    bundle = verify_bundle(bundle_path, expected_digest=digest)
    adapted, converted = load_for_training(
        bundle, resolved, checkpointing=checkpointing, device=device, lora_rank=lora_rank
    )
    plan = bundle.plan
    shared = 0
    if device.type == "cpu":  # one copy per host of what every worker prepared alike
        label = f"{digest}|{resolved}|torch {torch.__version__}"  # the frozen part's inputs
        shared = share_frozen(adapted.model, label, adapted.frozen)
        release_freed_memory()  # the worker's own copies, now unused
    memory = training_memory(adapted, checkpointing, device)
    tokenizer = load_client_tokenizer(bundle)
    session = Session(bundle, adapted, tokenizer, device, resolved, memory, shared)
    _SESSIONS.clear()  # one bundle per worker at a time
    _SESSIONS[key] = session
    log.info(
        "loaded bundle %s (%s) on %s, %s runtime, %s compute, %d packed and %d bf16 frozen "
        "linears, %d lean gated MLPs, %d norms cast once, %.0f MB frozen tensors shared with "
        "the host's other workers%s%s",
        digest[:12],
        plan.label,
        device,
        "lean" if converted["lean_runtime"] else "transformers",
        resolved,
        converted["packed_linears"],
        converted["bf16_linears"],
        converted["lean_mlps"],
        converted["cast_norms"],
        shared / 2**20,
        ", grouped-query attention unexpanded" if converted["gqa_attention"] else "",
        ", activation checkpointing" if checkpointing else "",
    )
    return session
