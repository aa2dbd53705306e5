"""Architecture registry: what Offsite needs to know about a model family, as data.

Each entry names, for one Hugging Face ``model_type``, where the transformer blocks live (a dotted
path relative to ``model.base_model``), which linear layers LoRA targets, which per-layer config
lists must follow the layer drop, and which Auto class loads it. One generic accessor uses it.
Adding a family = one entry here + it is picked up by the parametrized tiny-config tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from offsite.errors import ModelError

if TYPE_CHECKING:  # no transformers or torch import for the registry itself
    from torch import nn
    from transformers import PreTrainedConfig, PreTrainedModel

_PRE_NORMS = ("input_layernorm", "post_attention_layernorm")
_DECODER_LORA = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_ATTENTION_INPUTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_GATED_MLP_INPUTS = ("mlp.gate_proj", "mlp.up_proj")


GATED_MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# Config keys whose non-default values change a decoder's function in ways the client's lean
# decoder (client.runtime.decoder) does not compute: key -> the values it accepts.
LEAN_DECODER_REQUIRES: tuple[tuple[str, tuple[object, ...]], ...] = (
    ("pretraining_tp", (None, 1)),
    ("attn_logit_softcapping", (None,)),
    ("final_logit_softcapping", (None,)),
)


@dataclass(frozen=True)
class LeanDecoder:
    """How a family's config maps onto the client's lean decoder (``client.runtime.decoder``):
    which projections carry biases (a constant, or the config key that says) and which layers
    attend through a sliding window."""

    qkv_bias: bool | str
    o_bias: bool | str
    mlp_bias: bool | str
    window: str  # "none" | "all" (``sliding_window`` on every layer) | "layer_types"
    requires: tuple[tuple[str, tuple[object, ...]], ...] = LEAN_DECODER_REQUIRES


@dataclass(frozen=True)
class ArchSpec:
    """How to find and slice the transformer blocks of one model family."""

    model_type: str
    blocks: str  # dotted path of the block ModuleList, relative to ``model.base_model``
    lora_targets: tuple[str, ...]
    auto_class: str = "AutoModelForCausalLM"
    per_layer_config: tuple[str, ...] = ()  # config lists indexed by layer (sliced on drop)
    lora_fan_in_fan_out: bool = False  # GPT-2 style Conv1D weights
    # module names (suffixes inside a block) that write back into the residual stream: the
    # attention output and MLP down projections the `sparse` update policy trains
    output_projections: tuple[str, ...] = ("o_proj", "down_proj")
    # block-relative path of a gated MLP ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``, which
    # ``client.kernels.lean`` computes keeping one activation fewer (frozen or not); "" if none
    gated_mlp: str = ""
    # its (gate, up, down) projection names
    gated_mlp_projections: tuple[str, str, str] = GATED_MLP_PROJECTIONS
    # the family's Llama-style RMS norm class, y = w ⊙ x / rms(x) ("module.Class", matched by
    # name so no modeling code is imported to recognise it), which ``client.kernels.rms_norm``
    # computes keeping half the bytes; "" if none (Gemma's ``1 + w`` scale is another function)
    rms_norm: str = ""
    # the client's lean decoder runs this family (None: the client loads it through transformers)
    lean_decoder: LeanDecoder | None = None
    # block-relative names of the norms whose output only feeds linear layers (pre-norm blocks);
    # under autocast ``client.kernels.casts`` casts their output once instead of once per linear
    linear_input_norms: tuple[str, ...] = ()
    # the ``layer_types`` entry of global-attention layers: in a model that mixes attention
    # types, layer drop keeps these first (Gemma3: dropping one of its two middle global layers
    # took the 2-8-2 emulator's perplexity from ~2.5e3 to ~1.3e9, bench/reports/layer_drop.md)
    global_layer_type: str = "full_attention"
    # block-relative norms whose elementwise weight can be folded into the linears reading
    # their output (norm name, its consumers): y = W·(g ⊙ n(x)) = (W·diag g)·n(x), exact. A
    # compressed emulator folds them, so no norm weight of the owner ships as it is
    foldable_norms: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # what a norm's stored weight adds to its scale: 0 for y = w ⊙ n(x), 1 for Gemma's
    # y = (1 + w) ⊙ n(x); a folded norm stores the weight whose scale is 1
    norm_weight_offset: float = 0.0
    # block-relative names of every normalization layer in a block: with the biases, the
    # "small" tensors the `bias` and `sparse` update policies train
    block_norms: tuple[str, ...] = _PRE_NORMS

    @property
    def layers_pattern(self) -> str:
        """The module name PEFT's ``layers_to_transform`` matches (last part of ``blocks``)."""
        return self.blocks.rsplit(".", 1)[-1]

    @property
    def causal_lm(self) -> bool:
        return self.auto_class == "AutoModelForCausalLM"


def anchor_layers(config: PreTrainedConfig, arch: ArchSpec) -> tuple[int, ...]:
    """Indices of the global-attention layers of a model mixing attention types (kept first by
    layer drop); () for a model whose layers all attend alike."""
    types = getattr(config, "layer_types", None)
    if not isinstance(types, (list, tuple)) or len(set(types)) < 2:
        return ()
    return tuple(i for i, kind in enumerate(types) if kind == arch.global_layer_type)


REGISTRY: dict[str, ArchSpec] = {
    spec.model_type: spec
    for spec in (
        ArchSpec(
            "llama",
            "layers",
            _DECODER_LORA,
            per_layer_config=("layer_types",),
            gated_mlp="mlp",
            rms_norm="transformers.models.llama.modeling_llama.LlamaRMSNorm",
            lean_decoder=LeanDecoder("attention_bias", "attention_bias", "mlp_bias", window="none"),
            linear_input_norms=_PRE_NORMS,
            foldable_norms=(
                ("input_layernorm", _ATTENTION_INPUTS),
                ("post_attention_layernorm", _GATED_MLP_INPUTS),
            ),
        ),
        ArchSpec(
            "mistral",
            "layers",
            _DECODER_LORA,
            per_layer_config=("layer_types",),
            gated_mlp="mlp",
            rms_norm="transformers.models.mistral.modeling_mistral.MistralRMSNorm",
            lean_decoder=LeanDecoder(False, False, False, window="all"),
            linear_input_norms=_PRE_NORMS,
            foldable_norms=(
                ("input_layernorm", _ATTENTION_INPUTS),
                ("post_attention_layernorm", _GATED_MLP_INPUTS),
            ),
        ),
        ArchSpec(
            "qwen2",
            "layers",
            _DECODER_LORA,
            per_layer_config=("layer_types",),
            gated_mlp="mlp",
            rms_norm="transformers.models.qwen2.modeling_qwen2.Qwen2RMSNorm",
            lean_decoder=LeanDecoder(True, False, False, window="layer_types"),
            linear_input_norms=_PRE_NORMS,
            foldable_norms=(
                ("input_layernorm", _ATTENTION_INPUTS),
                ("post_attention_layernorm", _GATED_MLP_INPUTS),
            ),
        ),
        ArchSpec(
            "gemma3_text",
            "layers",
            _DECODER_LORA,
            per_layer_config=("layer_types",),
            gated_mlp="mlp",
            linear_input_norms=("input_layernorm", "pre_feedforward_layernorm"),
            # q_norm/k_norm and the post-attention/-feedforward norms act on a linear's output
            # and cannot be folded: they stay as they are
            foldable_norms=(
                ("input_layernorm", _ATTENTION_INPUTS),
                ("pre_feedforward_layernorm", _GATED_MLP_INPUTS),
            ),
            norm_weight_offset=1.0,
            block_norms=(
                *_PRE_NORMS,
                "pre_feedforward_layernorm",
                "post_feedforward_layernorm",
                "self_attn.q_norm",
                "self_attn.k_norm",
            ),
        ),
        ArchSpec(
            "gpt2",
            "h",
            ("c_attn", "c_proj", "c_fc"),
            lora_fan_in_fan_out=True,
            output_projections=("attn.c_proj", "mlp.c_proj"),
            linear_input_norms=("ln_1", "ln_2"),
            block_norms=("ln_1", "ln_2"),
        ),
        ArchSpec(
            "opt",
            "decoder.layers",
            ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
            output_projections=("out_proj", "fc2"),
            block_norms=("self_attn_layer_norm", "final_layer_norm"),
        ),
        ArchSpec(
            "bloom",
            "h",
            ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
            output_projections=("self_attention.dense", "dense_4h_to_h"),
        ),
        ArchSpec(
            "gpt_neox",
            "layers",
            ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"),
            per_layer_config=("layer_types",),
            output_projections=("attention.dense", "dense_4h_to_h"),
            linear_input_norms=_PRE_NORMS,
        ),
        ArchSpec(
            "bert",
            "encoder.layer",
            ("query", "key", "value", "dense"),
            auto_class="AutoModel",
            output_projections=("output.dense",),
            block_norms=("attention.output.LayerNorm", "output.LayerNorm"),
        ),
    )
}


def arch_spec(config: PreTrainedConfig) -> ArchSpec:
    """The registry entry for a Hugging Face config, or an error that says how to add one."""
    model_type = getattr(config, "model_type", None)
    if model_type in REGISTRY:
        return REGISTRY[model_type]
    supported = ", ".join(sorted(REGISTRY))
    raise ModelError(
        f"architecture {model_type!r} (config.json field `model_type`) is not supported; "
        f"supported: {supported}. To add it, register an ArchSpec in emulator/arch.py naming "
        "the block list path (e.g. 'layers') and the LoRA target module names"
    )


def model_config(model: nn.Module) -> PreTrainedConfig:
    """The Hugging Face config of ``model`` (``nn.Module`` attribute lookup alone types
    ``model.config`` as a tensor or sub-module)."""
    return cast("PreTrainedConfig", model.config)


def hf_model(model: nn.Module) -> PreTrainedModel:
    """``model`` seen as the Hugging Face model it is, for the methods ``nn.Module`` does not
    declare (``get_input_embeddings``, ``base_model``...); also a PEFT wrapper, or the client's
    lean decoder, which provide the methods used on them."""
    return cast("PreTrainedModel", model)


def _resolve(root: object, dotted: str) -> Any:
    node = root
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def block_list(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    """The ``nn.ModuleList`` of transformer blocks of ``model``."""
    try:
        blocks: nn.ModuleList = _resolve(model.base_model, spec.blocks)
        return blocks
    except AttributeError as err:
        raise ModelError(
            f"{type(model).__name__} has no block list at base_model.{spec.blocks}; "
            f"fix the ArchSpec for {spec.model_type!r} in emulator/arch.py"
        ) from err


def block_prefix(model: nn.Module, spec: ArchSpec, blocks: nn.Module | None = None) -> str:
    """State-dict prefix of the block list, e.g. ``model.layers`` (no trailing dot).

    Pass ``blocks`` (found before wrapping) to locate them inside a wrapper such as PEFT's.
    """
    blocks = block_list(model, spec) if blocks is None else blocks
    named: Iterator[tuple[str, nn.Module]] = model.named_modules()  # torch leaves it unannotated
    for name, module in named:
        if module is blocks:
            return name
    raise ModelError(f"block list of {type(model).__name__} is not a registered sub-module")
