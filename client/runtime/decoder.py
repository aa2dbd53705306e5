"""A Llama-family decoder in plain torch, numerically the same as transformers' modeling code.

It mirrors transformers' module tree and parameter names (``model.layers.3.self_attn.q_proj``,
``model.embed_tokens``, ``lm_head``), so bundle tensors load by name and the client's kernels,
LoRA layers and hooks find the modules they look for. What it computes, per block, is what
``LlamaDecoderLayer`` computes: RMS norm in fp32 then back to the input dtype, rotary embeddings
from fp32 cos/sin cast to the residual's dtype, grouped-query attention under a boolean
causal ∧ padding (∧ sliding-window) mask, and a gated MLP; tests compare logits and gradients
with transformers on tiny configs of every family the registry gives a ``lean_decoder``.

Attention runs on ``client.kernels.short_attention`` where it is the faster exact path (CPU,
short sequences) and on torch's ``scaled_dot_product_attention`` with unexpanded key/value heads
otherwise, the same choice ``client.kernels.attention`` makes for transformers models.

Families differ as data (``emulator.arch.LeanDecoder``, one field of each family's
``ArchSpec``): which projections carry biases and which layers attend through a sliding window.
``lean_config`` reads a bundle's ``config.json`` and returns None with
the reason when the config uses something this module does not compute (rotary scaling, other
activations, attention soft-capping...), and the client then loads the model through transformers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from client.kernels import rotary, short_attention
from emulator.arch import REGISTRY, LeanDecoder

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "gelu": nn.GELU,
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
}


@dataclass(frozen=True)
class LeanConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    hidden_act: str
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    windows: tuple[int | None, ...]  # per layer: sliding-window length, or None (full causal)


def _flag(config: dict[str, Any], rule: bool | str) -> bool:
    return rule if isinstance(rule, bool) else bool(config.get(rule, False))


def _rope_theta(config: dict[str, Any]) -> tuple[float | None, str]:
    params = config.get("rope_parameters")
    if isinstance(params, dict):
        if params.get("rope_type", "default") != "default":
            return None, f"rotary scaling {params.get('rope_type')!r}"
        return float(params.get("rope_theta", 10000.0)), ""
    if config.get("rope_scaling"):
        return None, f"rotary scaling {config['rope_scaling']!r}"
    return float(config.get("rope_theta", 10000.0)), ""


def _windows(
    config: dict[str, Any], family: LeanDecoder, layers: int
) -> tuple[int | None, ...] | str:
    window = config.get("sliding_window")
    types = config.get("layer_types") or ["full_attention"] * layers
    if len(types) != layers or set(types) - {"full_attention", "sliding_attention"}:
        return f"layer_types {types!r}"
    if family.window == "all":
        return tuple([int(window) if window else None] * layers)
    if family.window == "layer_types":
        return tuple(
            int(window) if window and kind == "sliding_attention" else None for kind in types
        )
    if "sliding_attention" in types:
        return "sliding-window layers"
    return tuple([None] * layers)


def lean_config(config: dict[str, Any]) -> tuple[LeanConfig | None, str]:
    """The decoder config for a Hugging Face ``config.json`` dict, or (None, why not)."""
    model_type = str(config.get("model_type"))
    spec = REGISTRY.get(model_type)
    family = spec.lean_decoder if spec is not None else None
    if family is None:
        return None, f"model_type {model_type!r} is not a lean-runtime family"
    for key, allowed in family.requires:
        if config.get(key) not in allowed:
            return None, f"{key}={config.get(key)!r}"
    theta, why = _rope_theta(config)
    if theta is None:
        return None, why
    act = str(config.get("hidden_act", "silu"))
    if act not in ACTIVATIONS:
        return None, f"activation {act!r}"
    layers = int(config["num_hidden_layers"])
    windows = _windows(config, family, layers)
    if isinstance(windows, str):
        return None, windows
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    lean = LeanConfig(
        model_type=model_type,
        vocab_size=int(config["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(config["intermediate_size"]),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        hidden_act=act,
        qkv_bias=_flag(config, family.qkv_bias),
        o_bias=_flag(config, family.o_bias),
        mlp_bias=_flag(config, family.mlp_bias),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        windows=windows,
    )
    return lean, ""


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class Rotary(nn.Module):
    """cos/sin of the default rotary embedding for given positions, in fp32 then the input dtype."""

    inv_freq: torch.Tensor  # a buffer (registered in __init__)

    def __init__(self, config: LeanConfig) -> None:
        super().__init__()
        dim = config.head_dim
        steps = torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim
        self.register_buffer("inv_freq", 1.0 / (config.rope_theta**steps), persistent=False)

    def forward(
        self, x: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device, torch.float32)
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(x.dtype), angles.sin().to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries and keys by their positions; queries may be the last positions only."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    queries = q.shape[-2]
    q_cos, q_sin = cos[..., -queries:, :], sin[..., -queries:, :]
    return q * q_cos + _rotate_half(q) * q_sin, k * cos + _rotate_half(k) * sin


class Attention(nn.Module):
    def __init__(self, config: LeanConfig) -> None:
        super().__init__()
        hidden, dim = config.hidden_size, config.head_dim
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = dim
        self.num_key_value_groups = heads // kv_heads
        self.scaling = dim**-0.5
        self.q_proj = nn.Linear(hidden, heads * dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(hidden, kv_heads * dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(hidden, kv_heads * dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(heads * dim, hidden, bias=config.o_bias)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        queries: int = 0,
    ) -> torch.Tensor:
        """Attention output for every position, or for the last ``queries`` ones only (keys and
        values still span the whole sequence)."""
        shape = (*x.shape[:-1], -1, self.head_dim)
        k = self.k_proj(x)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        if queries:
            # contiguous: matmul would broadcast each weight over a strided batch (a copy)
            x, mask = x[:, -queries:].contiguous(), mask[..., -queries:, :]
            shape = (*x.shape[:-1], -1, self.head_dim)
        q = self.q_proj(x)
        if rotary.takes(q, cos) and rotary.takes(k, cos):  # one fused pass each, same bits
            q = rotary.rotary_heads(q, cos, sin, q.shape[-1] // self.head_dim)
            k = rotary.rotary_heads(k, cos, sin, k.shape[-1] // self.head_dim)
        else:
            k = k.view(*k.shape[:-1], -1, self.head_dim).transpose(1, 2)
            q, k = apply_rotary(q.view(shape).transpose(1, 2), k, cos, sin)
        if short_attention.takes(q, k, mask, 0.0):
            out = short_attention.short_attention(q, k, v, mask, self.scaling)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=self.scaling, enable_gqa=k.shape[1] != q.shape[1]
            )
        out = out.transpose(1, 2).reshape(*x.shape[:-1], -1).contiguous()
        projected: torch.Tensor = self.o_proj(out)
        return projected


class GatedMLP(nn.Module):
    def __init__(self, config: LeanConfig) -> None:
        super().__init__()
        hidden, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(hidden, inner, bias=bias)
        self.up_proj = nn.Linear(hidden, inner, bias=bias)
        self.down_proj = nn.Linear(inner, hidden, bias=bias)
        self.act_fn = ACTIVATIONS[config.hidden_act]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return out


class Block(nn.Module):
    def __init__(self, config: LeanConfig, window: int | None) -> None:
        super().__init__()
        self.window = window
        self.self_attn = Attention(config)
        self.mlp = GatedMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        queries: int = 0,
    ) -> torch.Tensor:
        """The block's output at every position, or at the last ``queries`` positions only."""
        attended = self.self_attn(self.input_layernorm(x), mask, cos, sin, queries)
        x = (x[:, -queries:] if queries else x) + attended
        mixed: torch.Tensor = self.mlp(self.post_attention_layernorm(x))
        return x + mixed


def attention_masks(
    attention_mask: torch.Tensor | None, length: int, windows: set[int | None], device: torch.device
) -> dict[int | None, torch.Tensor]:
    """Boolean (B or 1, 1, T, T) masks, True where a query attends: causal, not padding, and
    within the window; one per distinct window."""
    query = torch.arange(length, device=device)[:, None]
    key = torch.arange(length, device=device)[None, :]
    causal = key <= query
    padding = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
    masks = {}
    for window in windows:
        allowed = causal if window is None else causal & (key > query - window)
        allowed = allowed[None, None]
        masks[window] = allowed if padding is None else allowed & padding
    return masks


class Decoder(nn.Module):
    def __init__(self, config: LeanConfig) -> None:
        super().__init__()
        # built on its table: nn.Embedding's own init on the meta device (how bundles load)
        # runs a Python decomposition that imports sympy and friends, ~70 MB resident
        table = torch.empty(config.vocab_size, config.hidden_size)
        if not table.is_meta:
            nn.init.normal_(table)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=table)
        self.layers = nn.ModuleList(Block(config, w) for w in config.windows)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = Rotary(config)
        self.gradient_checkpointing = False

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        keep: int = 0,
    ) -> torch.Tensor:
        """Final hidden states, (B, T, H); with ``keep``, (B, keep, H) for the last positions
        only, and the last block computes nothing else (its keys and values excepted)."""
        x = self.embed_tokens(input_ids)
        length = input_ids.shape[1]
        if position_ids is None:
            position_ids = torch.arange(length, device=x.device)[None]
        blocks = cast("Sequence[Block]", self.layers)  # nn.ModuleList is not generic
        windows = {layer.window for layer in blocks}
        masks = attention_masks(attention_mask, length, windows, x.device)
        cos, sin = self.rotary_emb(x, position_ids)
        queries = keep if 0 < keep < length else 0
        last = len(blocks) - 1
        for index, layer in enumerate(blocks):
            mask = masks[layer.window]
            args = (x, mask, cos, sin, queries if index == last else 0)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, *args, use_reentrant=False)
            else:
                x = layer(*args)
        normed: torch.Tensor = self.norm(x)
        return normed


@dataclass
class CausalOutput:
    logits: torch.Tensor


class LeanCausalLM(nn.Module):
    """``model`` (the decoder) and ``lm_head``, as in transformers' ``*ForCausalLM``."""

    def __init__(self, config: LeanConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    @property
    def base_model(self) -> nn.Module:
        """The decoder without its head (transformers' ``base_model``)."""
        return self.model

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict[str, Any] | None = None
    ) -> None:
        """Recompute each block in backward (non-reentrant checkpointing, as transformers)."""
        self.model.gradient_checkpointing = True

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        use_cache: bool | None = None,
    ) -> CausalOutput:
        hidden = self.model(input_ids, attention_mask, position_ids, keep=logits_to_keep)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:, :]
        return CausalOutput(self.lm_head(hidden))
