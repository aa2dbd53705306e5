"""Build a bundle the owner is willing to ship: split, measure what it gives away, gate, write."""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from emulator.adapter import AdapterSpec
from emulator.arch import ArchSpec, anchor_layers, block_list, block_prefix, model_config
from emulator.batches import text_batches
from emulator.bundle import Bundle, bundle_parts, write_bundle
from emulator.calibration import collect_activations
from emulator.digest import canonical_json, tensor_sha256
from emulator.distill import distill
from emulator.embeddings import expand_embeddings, quantize_embeddings
from emulator.factorize import factorize_linears
from emulator.fisher import output_gradient_moments
from emulator.fold import fold_norms
from emulator.forward import pick_device, resolve_precision
from emulator.layers import LayerPlan, plan_layers
from emulator.privacy import assess, enforce_gate, public_text_perplexity
from emulator.prune import prune_mlps
from emulator.quant import QuantScheme, quantize_linears
from emulator.selection import block_change_scores, select_by_change
from emulator.split import build_emulator, emulator_state, unique_state
from emulator.surgery import linear_weight, quantizable_linears
from emulator.tokenizers import Tokenizer
from offsite.config import EmulatorConfig, OffsiteConfig
from offsite.data import load_task
from offsite.errors import ConfigError

log = logging.getLogger(__name__)

_DISTILL_RECIPE = (
    "factorize",  # a factorized student is another model: never resumed from a dense one
    "factorize_energy",
    "factorize_budget",
    "factorize_max_rank_fraction",
    "factorize_rank_multiple",
    "fold_norms",
    "public_text",
    "public_examples",
    "distill_steps",
    "distill_lr",
    "distill_jacobian_weight",
    "distill_perturbation",
    "distill_texts",
    "distill_batch_size",
    "distill_max_length",
)
# recipe fields added later: in the key only when set, so earlier checkpoints keep theirs
_DISTILL_RECIPE_IF_SET = {
    "distill_gradient_weight": 0.0,
    "distill_lm_weight": 1.0,
    "prune_mlp": 0.0,  # a pruned student is another model
}


def public_texts(name: str, count: int) -> list[str]:
    """The first ``count`` texts of a public corpus (never the task data)."""
    task = load_task(name)
    texts = [(e.text + (e.completion or "")).strip() for e in task.examples]
    return [t for t in texts if t][:count]


def choose_plan(
    full_model: nn.Module, tokenizer: Tokenizer, arch: ArchSpec, settings: EmulatorConfig
) -> LayerPlan:
    """The layer plan for ``settings.selection`` (uniform, or cosine on public text). Uniform
    drop keeps a mixed-attention model's global layers first (``anchor_layers``)."""
    layers = int(model_config(full_model).num_hidden_layers)
    anchors = anchor_layers(model_config(full_model), arch)
    plan = plan_layers(layers, settings.bottom, settings.top, settings.keep, anchors)
    if settings.selection == "uniform" or settings.keep == -1:
        if pinned := sorted(set(anchors) & set(plan.middle_kept)):
            log.info("  uniform drop keeps the global-attention blocks %s first", pinned)
        return plan
    plan = plan_layers(layers, settings.bottom, settings.top, settings.keep)
    texts = public_texts(settings.public_text, settings.public_examples)
    scores = block_change_scores(full_model, tokenizer, texts)
    chosen = select_by_change(plan, scores, len(plan.middle_kept))
    log.info("  cosine selection kept middle blocks %s", list(chosen.middle_kept))
    return chosen


def build_configured_bundle(
    full_model: nn.Module,
    tokenizer: Tokenizer,
    arch: ArchSpec,
    config: OffsiteConfig,
    out_dir: Path,
) -> tuple[LayerPlan, Bundle]:
    """The plan ``config.emulator`` chooses and the bundle built by it, with the adapter
    ``config.train`` asks for: what a run, ``offsite emulator build`` and the benchmarks ship."""
    plan = choose_plan(full_model, tokenizer, arch, config.emulator)
    train = config.train
    adapter = AdapterSpec.for_plan(train.adapter, plan, arch, train.lora_r, train.lora_alpha)
    bundle = build_bundle(
        full_model,
        tokenizer,
        arch,
        plan,
        adapter,
        out_dir,
        source=config.model.name,
        settings=config.emulator,
    )
    return plan, bundle


def build_bundle(
    full_model: nn.Module,
    tokenizer: Tokenizer,
    arch: ArchSpec,
    plan: LayerPlan,
    adapter: AdapterSpec,
    out_dir: Path,
    *,
    source: str,
    settings: EmulatorConfig,
) -> Bundle:
    """Split ``full_model`` by ``plan``; distill and quantize as configured; assess the
    emulator, enforce the gate, write the bundle."""
    emulator = build_emulator(full_model, plan, arch)
    perplexity_fn = None
    compression: dict[str, Any] = {
        "method": "layer-drop",
        "selection": settings.selection,
        "kept_middle": len(plan.middle_kept),
    }
    texts: list[str] = []
    count = settings.public_examples
    if settings.public_text:  # calibration for any model; perplexity and KD for causal LMs
        extra = settings.distill_texts + count if settings.distill and arch.causal_lm else 0
        texts = public_texts(settings.public_text, count + extra + settings.calibration_examples)
        if arch.causal_lm:
            perplexity_fn = public_text_perplexity(tokenizer, texts[:count])
    calibration = texts[count : count + settings.calibration_examples]
    # (pruning is refused without one of these, so it never rewrites on its own)
    rewritten = settings.factorize != "none" or settings.quantize != "none"
    if settings.fold_norms and arch.foldable_norms and rewritten:
        # only when the linears are then changed: a fold alone changes bytes, not the function
        middle = _middle_blocks(emulator, plan, arch).values()
        compression["folded_norms"] = fold_norms(middle, arch)
    dense_params = None  # what factorize_budget is a share of: the middle before pruning
    if settings.prune_mlp:
        dense_params = _middle_linear_params(emulator, plan, arch)
        compression["pruning"] = prune_emulator(
            emulator, plan, arch, settings, tokenizer, calibration
        )
    if settings.factorize != "none":
        compression["factorization"] = factorize_emulator(
            emulator, plan, arch, settings, tokenizer, calibration, dense_params
        )
    if texts and settings.distill and arch.causal_lm:
        compression["distilled"] = _distill(
            full_model, emulator, plan, arch, tokenizer, texts, settings, out_dir
        )
    if settings.quantize != "none":
        compression["quantization"] = quantize_emulator(
            emulator, plan, arch, tokenizer, calibration, settings
        )
    changed = settings.distill or rewritten  # folding happens only when rewritten
    shipped = unique_state(emulator) if changed else emulator_state(full_model, plan, arch)
    shipped = dict(shipped)
    embeddings = quantize_embeddings(
        emulator, shipped, settings.embeddings, settings.quant_group_size
    )
    if embeddings is not None:
        compression["embeddings"] = embeddings
        # the perplexity gate judges what ships: the emulator with the embeddings it will load
        expand_embeddings(expanded := dict(shipped), embeddings, torch.float32)
        for name in embeddings["tensors"]:
            with torch.no_grad():
                emulator.get_parameter(name).copy_(expanded[name])
    report = assess(full_model, emulator, plan, arch, shipped, perplexity_fn)
    enforce_gate(report, settings.min_perplexity_ratio, settings.max_verbatim_fraction)
    bundle = write_bundle(
        full_model,
        tokenizer,
        plan,
        adapter,
        out_dir,
        source=source,
        privacy=report,
        compression=compression,
        state=shipped,
    )
    log.info("  %s", describe_privacy(report))
    return bundle


def _distill(
    full_model: nn.Module,
    emulator: nn.Module,
    plan: LayerPlan,
    arch: ArchSpec,
    tokenizer: Tokenizer,
    texts: list[str],
    settings: EmulatorConfig,
    out_dir: Path,
) -> dict[str, Any]:
    count = settings.public_examples
    held = texts[count : 2 * count]
    train = texts[2 * count : 2 * count + settings.distill_texts]
    device = pick_device()
    result = distill(
        full_model,
        emulator,
        plan,
        arch,
        tokenizer,
        train,
        held,
        steps=settings.distill_steps,
        lr=settings.distill_lr,
        batch_size=settings.distill_batch_size,
        max_length=settings.distill_max_length,
        jacobian_weight=settings.distill_jacobian_weight,
        perturbation=settings.distill_perturbation,
        gradient_weight=settings.distill_gradient_weight,
        lm_weight=settings.distill_lm_weight,
        precision=resolve_precision("auto", device),
        device=device,
        checkpoint=Path(settings.distill_checkpoint)
        if settings.distill_checkpoint
        else out_dir.with_name(out_dir.name + ".distill-checkpoint"),
        checkpoint_key=distill_key(full_model, plan, arch, settings),
    )
    full_model.to("cpu")
    emulator.to("cpu")
    return {
        "corpus": settings.public_text,
        "texts": len(train),
        "lr": settings.distill_lr,
        **result.to_dict(),
    }


def distill_key(
    full_model: nn.Module, plan: LayerPlan, arch: ArchSpec, settings: EmulatorConfig
) -> str:
    """What a distilled student depends on: teacher, plan and recipe (checkpoints are reused
    only when it matches)."""
    teacher = {
        name: tensor_sha256(t) for name, t in block_list(full_model, arch)[0].state_dict().items()
    }
    recipe = {k: getattr(settings, k) for k in _DISTILL_RECIPE}
    recipe |= {
        k: getattr(settings, k)
        for k, default in _DISTILL_RECIPE_IF_SET.items()
        if getattr(settings, k) != default
    }
    payload = {
        "config": model_config(full_model).to_dict(),
        "teacher_block0": teacher,
        "plan": plan.to_dict(),
        "recipe": recipe,
    }
    return hashlib.sha256(canonical_json(payload)).hexdigest()


def _middle_blocks(emulator: nn.Module, plan: LayerPlan, arch: ArchSpec) -> dict[int, nn.Module]:
    """The emulator's kept middle blocks by emulator index."""
    blocks = block_list(emulator, arch)
    first = len(plan.bottom)
    return {i: blocks[i] for i in range(first, first + len(plan.middle_kept))}


def _calibration_batches(
    tokenizer: Tokenizer, texts: list[str], max_length: int
) -> list[dict[str, torch.Tensor]]:
    return [
        {"input_ids": b.input_ids, "attention_mask": b.attention_mask}
        for b in text_batches(tokenizer, texts, max_length, 8)
    ]


def _middle_linear_params(emulator: nn.Module, plan: LayerPlan, arch: ArchSpec) -> int:
    """Weights of the kept middle blocks' linears (what factorize_budget is a share of)."""
    linears = quantizable_linears(
        _middle_blocks(emulator, plan, arch), block_prefix(emulator, arch)
    )
    return sum(found[0].numel() for m in linears.values() if (found := linear_weight(m)))


def prune_emulator(
    emulator: nn.Module,
    plan: LayerPlan,
    arch: ArchSpec,
    settings: EmulatorConfig,
    tokenizer: Tokenizer,
    calibration: list[str],
) -> dict[str, Any]:
    """Remove ``settings.prune_mlp`` of the kept middle blocks' gated-MLP channels where the LM
    loss on ``calibration`` needs them least (``emulator.prune``), in place; the manifest's
    pruning entry."""
    if not (arch.gated_mlp and arch.causal_lm):
        raise ConfigError(
            f"emulator.prune_mlp: {arch.model_type} has no gated MLP under a language-modelling "
            "head to score channels with; set emulator.prune_mlp=0"
        )
    if not calibration:
        raise ConfigError(
            "emulator.prune_mlp found no calibration text in emulator.public_text; point it at "
            "a non-empty corpus"
        )
    prefix = block_prefix(emulator, arch)
    mlps = {
        f"{prefix}.{index}.{arch.gated_mlp}": block.get_submodule(arch.gated_mlp)
        for index, block in _middle_blocks(emulator, plan, arch).items()
    }
    multiple = settings.factorize_rank_multiple
    if settings.quantize == "int4":  # a pruned down projection's input is the kept channels
        multiple = math.lcm(multiple, settings.quant_group_size)
    batches = _calibration_batches(tokenizer, calibration, settings.distill_max_length)
    entry = prune_mlps(
        emulator, mlps, arch.gated_mlp_projections, batches, settings.prune_mlp, multiple
    )
    log.info(
        "  pruned %d of %d middle MLP channels (%.0f %%), estimated loss rise %.3g",
        entry["channels"] - entry["kept_channels"],
        entry["channels"],
        100 * (1 - entry["kept_channels"] / entry["channels"]),
        entry["estimated_loss_rise"],
    )
    return entry


def factorize_emulator(
    emulator: nn.Module,
    plan: LayerPlan,
    arch: ArchSpec,
    settings: EmulatorConfig,
    tokenizer: Tokenizer = None,
    calibration: list[str] | None = None,
    dense_params: int | None = None,
) -> dict[str, Any]:
    """Replace the kept middle blocks' linears by truncated SVDs in place; the manifest's
    factorization entry. 'whitened-svd' weighs each linear by the second moment of its inputs
    on ``calibration`` (the dense emulator's); 'fisher-svd' also by that of the LM loss's
    gradient at its output (``emulator.fisher``) and spreads ``factorize_budget`` over all
    of them (``dense_params``: the dense parameters that budget is a share of, when channel
    pruning already removed some). Under int4 the ranks are multiples of the quantization
    group (the ``up`` factor's input is the rank)."""
    linears = quantizable_linears(
        _middle_blocks(emulator, plan, arch), block_prefix(emulator, arch)
    )
    multiple = settings.factorize_rank_multiple
    if settings.quantize == "int4":
        multiple = math.lcm(multiple, settings.quant_group_size)
    moments = gradients = None
    fisher = settings.factorize == "fisher-svd"
    if fisher and not arch.causal_lm:  # no LM loss to weigh by: spread the budget by energy
        log.info(
            "  fisher-svd: %s has no language-modelling head; ranks follow the whitened "
            "output energy under the same budget",
            arch.model_type,
        )
    if settings.factorize in ("whitened-svd", "fisher-svd"):
        if not calibration:
            raise ConfigError(
                f"emulator.factorize='{settings.factorize}' found no calibration text in "
                "emulator.public_text; point it at a non-empty corpus"
            )
        batches = _calibration_batches(tokenizer, calibration, settings.distill_max_length)
        stats = collect_activations(emulator, linears, batches, gram=True)
        moments = {name: entry.second_moment() for name, entry in stats.items()}
        if fisher and arch.causal_lm:
            gradients = output_gradient_moments(emulator, linears, batches)
    entry = factorize_linears(
        emulator,
        linears,
        settings.factorize_energy,
        settings.factorize_max_rank_fraction,
        multiple,
        moments,
        gradients,
        budget=settings.factorize_budget if fisher else None,
        reference_params=dense_params,
    )
    entry["calibration_texts"] = len(calibration or []) if moments else 0
    log.info(
        "  factorized %d middle linears by %s: %.1f M -> %.1f M parameters, mean relative "
        "error %.3f",
        len(linears),
        entry["method"],
        entry["dense_params"] / 1e6,
        entry["factored_params"] / 1e6,
        entry["mean_relative_error"],
    )
    return entry


def quantize_emulator(
    emulator: nn.Module,
    plan: LayerPlan,
    arch: ArchSpec,
    tokenizer: Tokenizer,
    calibration: list[str],
    settings: EmulatorConfig,
) -> dict[str, Any]:
    """Quantize the emulator's kept middle linears in place; the manifest's quantization entry.

    With calibration text the per-channel input scales are searched (AWQ); without (encoders,
    no public text) weights are rounded to nearest.
    """
    scheme = QuantScheme(settings.quantize, settings.quant_group_size, settings.awq)
    linears = quantizable_linears(
        _middle_blocks(emulator, plan, arch), block_prefix(emulator, arch)
    )
    activations = None
    if calibration:
        batches = _calibration_batches(tokenizer, calibration, settings.distill_max_length)
        activations = collect_activations(emulator, linears, batches)
    summary = quantize_linears(emulator, linears, scheme, activations)
    log.info(
        "  quantized %d middle linears to %s (calibrated on %d texts)",
        len(linears),
        scheme.name,
        len(calibration),
    )
    return {
        "scheme": scheme.to_dict(),
        "calibration_texts": len(calibration),
        **summary,
        "modules": sorted(linears),
    }


def describe_privacy(report: dict[str, Any]) -> str:
    text = (
        f"middle tensors shipped verbatim: {report['middle_tensors_verbatim']} of "
        f"{report['middle_tensors']} ({100 * report['middle_verbatim_fraction']:.0f} %)"
    )
    if "perplexity_ratio" in report:
        text += (
            f"; public-text perplexity emulator {report['emulator_perplexity']:.1f} vs full "
            f"{report['full_perplexity']:.1f} (ratio {report['perplexity_ratio']:.2f})"
        )
    return text


def describe_compression(manifest: dict[str, Any]) -> str:
    """One line: bundle size against the full model, factorization, quantization, distillation."""
    size = sum(int(f["size"]) for f in manifest["files"].values())
    text = f"bundle {size / 1e6:.1f} MB"
    full = manifest.get("privacy", {}).get("full_model_bytes")
    if full:
        text += f" = {100 * size / full:.0f} % of the full model ({full / 1e6:.1f} MB)"
    compression = manifest.get("compression", {})
    if factors := compression.get("factorization"):
        text += (
            f"; middle linears SVD-factorized ({factors['dense_params'] / 1e6:.1f} M -> "
            f"{factors['factored_params'] / 1e6:.1f} M parameters, mean relative error "
            f"{factors['mean_relative_error']:.3f})"
        )
    if quant := compression.get("quantization"):
        error = quant.get("mean_relative_error")
        text += f"; middle linears {quant['scheme']['name']}" + (
            f" (mean relative output error {error:.4f} on calibration text)" if error else ""
        )
    if distilled := compression.get("distilled"):
        text += (
            f"; distilled {distilled['steps']} steps (best at {distilled['best_step']}, "
            f"{distilled.get('seconds', 0):.0f} s)"
        )
    embeddings = compression.get("embeddings")
    parts = ", ".join(f"{k} {v / 1e6:.1f}" for k, v in bundle_parts(manifest).items())
    stored = embeddings["scheme"]["name"] if embeddings else "full precision"
    return text + f"; by part (MB): {parts}; embeddings {stored}"
