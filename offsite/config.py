"""One typed configuration for Offsite.

Decisions:
- Frozen dataclasses, one per component; each component receives only its own section.
- Sources, later wins: defaults < TOML file < ``section.key=value`` overrides.
- Unknown sections/keys, wrong types and out-of-range values are *all* reported in one
  ``ConfigError``, so a user fixes a config in one pass.
- Help text lives in field metadata and is what ``offsite config --help``-style listings show.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import tomli_w

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI (a dependency there only)
    import tomli as tomllib

from offsite.errors import ConfigError
from offsite.federation.robust import (
    DEFAULT_SERVER_LR,
    SERVER_OPTIMIZERS,
    AggregationRule,
    ServerStrategy,
    rule_problems,
    strategy_problems,
)
from offsite.host.sizes import parse_size
from offsite.policies import POLICIES, PolicyName


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


class _Section:
    """Mixin: sections validate themselves on construction."""

    def problems(self) -> list[str]:
        return []

    def __post_init__(self) -> None:
        found = self.problems()
        if found:
            raise ConfigError("; ".join(found))


@dataclass(frozen=True)
class ModelConfig(_Section):
    """The owner's full model: where it comes from."""

    name: str = _f(
        "smollm2-135m",
        "Full model: an embedded catalog name (see `offsite models`), a local Hugging Face "
        "directory, or a Hugging Face id already in the local cache.",
    )


@dataclass(frozen=True)
class EmulatorConfig(_Section):
    """How the full model is split into adapter and emulator, how the emulator is compressed
    (layer drop, factorization, quantization, distillation), and the owner's privacy gates."""

    bottom: int = _f(
        1,
        "Adapter blocks taken from the bottom of the model (trainable). 1 bottom + 3 top is "
        "the default since 2026-12-07: with the default compression it beat 2 + 2 on every "
        "paired seed (SmolLM2, 3 seeds: bbc-news plug-in 81.2 vs 73.9 %, margin +5.9 vs -2.2; "
        "chatterbot-topics plug-in and margin higher too), as the gradient score predicted "
        "(0.345 vs 0.557; bench/reports/emulator_transfer.md).",
    )
    top: int = _f(3, "Adapter blocks taken from the top of the model (trainable).")
    keep: int = _f(
        -1,
        "Middle blocks kept in the emulator (layer drop, see emulator.selection); -1 keeps all "
        "of them, and the default compresses each instead (emulator.factorize, fold_norms, "
        "quantize): on SmolLM2 over 3 seeds (2 + 2 adapter blocks) that matched the 2-16-2 "
        "layer drop's plug-in on "
        "bbc-news (73.9 vs 72.0 %, unresolved) and beat it on chatterbot-topics (52.0 vs "
        "39.0 %, paired +13.0 ± 9.4) with nothing verbatim and 40 % of the bytes "
        "(bench/reports/emulator_transfer.md).",
    )
    selection: Literal["uniform", "cosine"] = _f(
        "uniform",
        "How middle blocks are chosen: 'uniform' (the offsite-tuning reference) or 'cosine' "
        "(keep the blocks that change the hidden state most on public text; training-free).",
    )
    public_text: str = _f(
        "chitchat",
        "Public text for the emulator/full perplexity ratio: a catalog name or a JSONL file; "
        "empty skips the measurement.",
    )
    public_examples: int = _f(32, "How many public texts the perplexity ratio uses.")
    min_perplexity_ratio: float = _f(
        0.0, "Gate: refuse emulators whose perplexity ratio to the full model is lower (0 = off)."
    )
    max_verbatim_fraction: float = _f(
        1.0, "Gate: refuse emulators shipping more of the full model's middle tensors verbatim."
    )
    min_margin: float = _f(
        0.0,
        "Gate of `offsite emulator build --choose`: refuse measured emulators whose margin "
        "(plug-in − emulator fine-tuned, points; low end of its 95 % CI) is smaller, i.e. "
        "that a data owner would prefer to the product.",
    )
    distill: bool = _f(
        False,
        "Distill the kept middle blocks against the full middle on the public text "
        "(LM loss + 30 x normalised MSE of the middle's output).",
    )
    distill_steps: int = _f(200, "Distillation optimizer steps.")
    distill_lr: float = _f(1e-4, "Distillation learning rate (AdamW).")
    distill_texts: int = _f(2000, "Public texts used for distillation (after the held-out ones).")
    distill_batch_size: int = _f(8, "Texts per distillation step.")
    distill_max_length: int = _f(128, "Tokens per distillation text.")
    distill_jacobian_weight: float = _f(
        0.0,
        "Weight of distillation's second term: the middle's response to a perturbation of its "
        "input (what the bottom adapter's update causes) matched to the full middle's "
        "(finite-difference Jacobian); 0 = off, output matching only. Doubles a step's cost.",
    )
    distill_perturbation: float = _f(
        0.1, "Jacobian term: perturbation size as a fraction of each token's hidden-state RMS."
    )
    distill_gradient_weight: float = _f(
        0.0,
        "Weight of the gradient term: the LM loss's gradient that the student's middle passes "
        "back to its input (what the bottom adapter receives) matched to the full middle's, "
        "for the gradient the full model's top sends; 0 = off. About triples a step's cost.",
    )
    distill_lm_weight: float = _f(
        1.0,
        "Weight of the LM loss in distillation; 0 trains the middle to match the full "
        "middle's output (and gradients) only, not to be a better language model by itself.",
    )
    distill_checkpoint: str = _f(
        "",
        "Folder for the distillation checkpoint (resume, or reuse a finished distillation for "
        "another bundle of the same model and plan); empty = next to the bundle.",
    )
    factorize: Literal["none", "svd", "whitened-svd", "fisher-svd"] = _f(
        "fisher-svd",
        "Replace each kept middle linear by a truncated SVD (two smaller linears, rank chosen "
        "per matrix by factorize_energy): no original weight matrix ships. 'svd' is best for "
        "the weight; 'whitened-svd' is best for the layer's output on public calibration text "
        "(SVD of W·S, S·Sᵀ the inputs' second moment; needs emulator.public_text); "
        "'fisher-svd' (causal LMs) also weighs the output by the LM loss's gradient there "
        "(K-FAC), so each truncation has an estimated loss cost and one budget of parameters "
        "(factorize_budget) goes where it costs least (a model without an LM head: by output "
        "energy instead). Norms and biases stay verbatim unless emulator.fold_norms or "
        "emulator.distill changes them.",
    )
    factorize_budget: float = _f(
        0.433,
        "fisher-svd: the factors of all kept middle linears together hold at most this share "
        "of their dense parameters (each matrix within factorize_max_rank_fraction, and never "
        "below one group of factorize_rank_multiple ranks, which tiny models can exceed). The "
        "default is whitened-svd at 95 % energy's share on SmolLM2, where the two were compared "
        "(plug-in 73.9 ± 22.7 vs 73.5 ± 6.3 on bbc-news, 52.0 ± 8.4 vs 39.7 ± 49.1 on "
        "chatterbot-topics, 3 seeds).",
    )
    fold_norms: bool = _f(
        True,
        "Fold the kept middle blocks' pre-norm weights into the linears that read them (exact; "
        "architectures that declare foldable norms), so the owner's norm weights do not ship "
        "as they are when the linears are then factorized or quantized.",
    )
    factorize_energy: float = _f(
        0.95,
        "SVD: keep the smallest rank holding this share of a matrix's squared singular values "
        "(of W·S under whitened-svd). The owner's dial between transfer and margin: with every "
        "middle block kept, whitened, folded and int8, on SmolLM2 / bbc-news (seed 0) 0.9 gave "
        "plug-in 60 % (margin +13), 0.95 73 % (+11; over 3 seeds 73.5 ± 6.3, margin 0.2 ± "
        "24.5), 0.99 88 % (margin -2); on chatterbot-topics 0.95 gave 39.7 ± 49.1 (once below "
        "zero-shot).",
    )
    factorize_max_rank_fraction: float = _f(
        1.0,
        "SVD: rank at most this fraction of the break-even rank in·out/(in+out), so every "
        "factorized matrix is smaller than the dense one and never recovers it exactly.",
    )
    factorize_rank_multiple: int = _f(8, "SVD: ranks rounded up to a multiple of this.")
    prune_mlp: float = _f(
        0.0,
        "Remove this share of the kept middle blocks' gated-MLP channels (rows of gate and up, "
        "columns of down) where the LM loss on public text needs them least (first-order "
        "Taylor cost, comparable across blocks, so blocks lose different shares; causal LMs "
        "with a gated MLP, needs emulator.public_text). Before factorization, whose "
        "factorize_budget stays a share of the unpruned middle, so the bundle keeps its size "
        "and the budget goes to the channels that remain. 0 = off (at 0.5 on SmolLM2 1-26-3, "
        "one seed, the emulator fine-tuned to 81.0 % and the plug-in stayed at 71.0 %).",
    )
    quantize: Literal["none", "int8", "int4"] = _f(
        "int8",
        "Store the emulator's middle linears weight-only quantized: 'int8' (per output "
        "channel) or 'int4' (group-wise, see quant_group_size). Adapter blocks, embeddings, "
        "norms and head stay full precision.",
    )
    quant_group_size: int = _f(64, "int4: input channels sharing one scale and zero point.")
    embeddings: Literal["full", "int8", "int4"] = _f(
        "full",
        "How the bundle stores the token embeddings and an untied head (no policy trains them): "
        "'full', 'int8' per token row (a quarter of the bytes: Gemma3-270m's 2-8-2 bundle 972 -> "
        "469 MB; the plug-in keeps the full model's) or 'int4' in groups. Not yet the default: "
        "on one seed of the default run int8 gave plug-in 68.0 vs 74.0 %, unresolved by a "
        "single seed.",
    )
    awq: bool = _f(
        True,
        "Activation-aware scaling: search per-channel input scales on public text that protect "
        "channels with large activations (off = plain round-to-nearest).",
    )
    calibration_examples: int = _f(64, "Public texts the quantization calibration runs on.")
    reuse_bundle: bool = _f(
        True,
        "Copy the bundle from the cache ($OFFSITE_HOME/bundles, or $OFFSITE_BUNDLES) when the "
        "same weights, emulator settings and adapter built it before, verifying every file; "
        "false always builds. The cache keeps the 4 most recently used bundles.",
    )

    def problems(self) -> list[str]:
        out = []
        if self.bottom < 0 or self.top < 0:
            out.append("emulator.bottom and emulator.top must be >= 0")
        if self.bottom + self.top == 0:
            out.append("emulator.bottom + emulator.top must be >= 1 (nothing would be trained)")
        if self.keep < -1 or self.keep == 0:
            out.append("emulator.keep must be -1 (all) or >= 1")
        if self.public_examples < 1:
            out.append("emulator.public_examples must be >= 1")
        if not 0.0 <= self.max_verbatim_fraction <= 1.0:
            out.append("emulator.max_verbatim_fraction must be in [0, 1]")
        if self.min_perplexity_ratio < 0:
            out.append("emulator.min_perplexity_ratio must be >= 0")
        if self.selection == "cosine" and not self.public_text:
            out.append("emulator.selection='cosine' needs emulator.public_text (calibration)")
        if self.factorize in ("whitened-svd", "fisher-svd") and not self.public_text:
            out.append(
                f"emulator.factorize='{self.factorize}' needs emulator.public_text (its "
                "calibration text); set one, or emulator.factorize='svd' / 'none'"
            )
        if not 0.0 < self.factorize_budget <= 1.0:
            out.append("emulator.factorize_budget must be in (0, 1]")
        if self.distill and not self.public_text:
            out.append("emulator.distill needs emulator.public_text (the distillation corpus)")
        if not 0.0 < self.factorize_energy <= 1.0:
            out.append("emulator.factorize_energy must be in (0, 1]")
        if not 0.0 < self.factorize_max_rank_fraction <= 1.0:
            out.append("emulator.factorize_max_rank_fraction must be in (0, 1]")
        if self.factorize_rank_multiple < 1:
            out.append("emulator.factorize_rank_multiple must be >= 1")
        if not 0.0 <= self.prune_mlp < 1.0:
            out.append("emulator.prune_mlp must be in [0, 1)")
        if self.prune_mlp and not self.public_text:
            out.append("emulator.prune_mlp needs emulator.public_text (its calibration text)")
        if self.prune_mlp and self.factorize == "none" and self.quantize == "none":
            out.append(
                "emulator.prune_mlp alone ships the kept channels' weights as they are; also set "
                "emulator.factorize or emulator.quantize"
            )
        if self.quant_group_size < 2 or self.quant_group_size % 2:
            out.append("emulator.quant_group_size must be an even number >= 2")
        if self.calibration_examples < 1:
            out.append("emulator.calibration_examples must be >= 1")
        if self.distill_steps < 1 or self.distill_texts < 1 or self.distill_batch_size < 1:
            out.append("emulator.distill_steps, distill_texts and distill_batch_size must be >= 1")
        if self.distill_gradient_weight < 0 or self.distill_lm_weight < 0:
            out.append("emulator.distill_gradient_weight and distill_lm_weight must be >= 0")
        if self.distill_jacobian_weight < 0 or not 0 < self.distill_perturbation <= 1:
            out.append(
                "emulator.distill_jacobian_weight must be >= 0 and distill_perturbation in (0, 1]"
            )
        return out


@dataclass(frozen=True)
class DataConfig(_Section):
    """The task data, its prompt template and labels, the held-out split and how training data
    is partitioned across clients."""

    name: str = _f(
        "bbc-news",
        "Task data: an embedded catalog name (see `offsite datasets`), a JSONL file with "
        '{"text","label"} or {"prompt","completion"} rows, or a folder with one sub-folder '
        "of .txt files per label.",
    )
    template: str = _f(
        "",
        "Classification prompt with a {text} slot, e.g. 'Review: {text}\\nSentiment:'; "
        "empty uses the data set's own (catalog) or 'Text: {text}\\nCategory:'.",
    )
    text_field: str = _f("text", "JSONL field holding the input text.")
    label_field: str = _f("label", "JSONL field holding the class label.")
    eval_size: int = _f(150, "Held-out examples for evaluation; clients never see them.")
    max_length: int = _f(128, "Maximum tokens per example (prompt + answer).")
    max_words: int = _f(90, "Input text is cut to this many words before tokenizing.")
    partition: Literal["dirichlet", "iid"] = _f(
        "dirichlet", "How training data is split across clients (non-IID by default)."
    )
    alpha: float = _f(1.0, "Dirichlet concentration over labels; smaller is more skewed.")
    quantity_alpha: float = _f(
        0.0,
        "Quantity skew: clients' shares of the training data are drawn from a seeded "
        "Dirichlet with this concentration (smaller = more unequal; 1 is strongly skewed), "
        "on top of the label skew; 0 = off (shares of about equal size).",
    )

    def problems(self) -> list[str]:
        out = []
        if self.eval_size < 1:
            out.append("data.eval_size must be >= 1")
        if self.max_length < 8:
            out.append("data.max_length must be >= 8")
        if self.max_words < 1:
            out.append("data.max_words must be >= 1")
        if self.alpha <= 0:
            out.append("data.alpha must be > 0")
        if self.quantity_alpha < 0:
            out.append("data.quantity_alpha must be >= 0 (0 = no quantity skew)")
        if self.template and self.template.count("{text}") != 1:
            out.append("data.template must contain {text} exactly once")
        return out


def learning_rate(train: TrainConfig) -> float:
    """``train.lr``, or the update policy's default learning rate when it is 0."""
    return train.lr if train.lr > 0 else POLICIES[train.adapter].lr


@dataclass(frozen=True)
class TrainConfig(_Section):
    """What each client trains (the update policy) and how: optimizer, steps, precision,
    memory budget and what it uploads."""

    adapter: PolicyName = _f(  # noqa: RUF009 -- _f is a field(); ruff cannot see through the alias
        "lora",
        "Update policy: 'lora' (PEFT LoRA in the adapter blocks), 'lora-fa' (LoRA with A frozen "
        "at its seeded start, only B trained: exact federated averaging; FFA-LoRA), 'full' (all "
        "their tensors), "
        "'bias' (biases and norms), 'top' (top adapter blocks only: backward never enters the "
        "emulator), 'lora-top' (LoRA in the top adapter blocks only), 'sparse' (top blocks "
        "fully, bottom blocks' output projections and norms).",
    )
    lora_r: int = _f(8, "LoRA rank.")
    lora_alpha: int = _f(16, "LoRA scaling numerator (scale = alpha / r).")
    lr: float = _f(
        0.0,
        "AdamW learning rate; 0 = the policy's default (lora, lora-fa and lora-top 2e-3, best "
        "for r=8 on the default; bias 1e-3; full, top and sparse 1e-4, since they move "
        "pretrained weights).",
    )
    batch_size: int = _f(8, "Examples per local step.")
    local_steps: int = _f(10, "Optimizer steps each client runs per round.")
    precision: Literal["auto", "fp32", "bf16"] = _f(
        "auto", "Compute precision: 'auto' uses bf16 autocast where the CPU/GPU supports it."
    )
    upload: Literal["dense", "sparse"] = _f(
        "dense",
        "What a client sends back: 'dense' (every trainable tensor) or 'sparse' (only the "
        "changes, see upload_fraction).",
    )
    upload_fraction: float = _f(
        1.0,
        "Sparse upload: share of each changed tensor's entries sent per round, largest first; "
        "the rest is carried into the next round (error feedback). 1 = every changed entry.",
    )

    client_ranks: str = _f(
        "",
        "Heterogeneous LoRA ranks, e.g. '8,4,2': simulated client i trains rank "
        "ranks[i % len(ranks)] (each <= lora_r; a node's own `lora-rank` node config wins). "
        "Needs federation.lora_aggregation='merge-exact'; empty = every client trains lora_r.",
    )
    memory_budget: str = _f(
        "",
        "Each client's peak-memory budget, e.g. '1.5GB': a client probes its training and turns "
        "on activation checkpointing if that is what fits, or refuses with the numbers; "
        "empty = no limit. A node's own `offsite client start --memory-budget` overrides it.",
    )

    @property
    def ranks(self) -> tuple[int, ...]:
        """``client_ranks`` parsed (empty: every client trains ``lora_r``)."""
        return tuple(int(r) for r in self.client_ranks.replace(" ", "").split(",") if r)

    def problems(self) -> list[str]:
        out = []
        if self.memory_budget:
            try:
                parse_size(self.memory_budget)
            except ValueError as err:
                out.append(f"train.memory_budget: {err}")
        if not 0 < self.upload_fraction <= 1:
            out.append("train.upload_fraction must be in (0, 1]")
        if self.lora_r < 1:
            out.append("train.lora_r must be >= 1")
        try:
            ranks = self.ranks
        except ValueError:
            out.append(
                f"train.client_ranks must be comma-separated integers, got {self.client_ranks!r}"
            )
        else:
            if any(not 1 <= r <= self.lora_r for r in ranks):
                out.append(f"train.client_ranks must each be in [1, train.lora_r={self.lora_r}]")
        if self.lr < 0:
            out.append("train.lr must be > 0 (or 0 for the update policy's default)")
        if self.batch_size < 1:
            out.append("train.batch_size must be >= 1")
        if self.local_steps < 1:
            out.append("train.local_steps must be >= 1")
        return out


_HOST = r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])"
_RAY_ADDRESS = re.compile(rf"(?:ray://)?{_HOST}:(?P<port>[0-9]{{1,5}})")


def ray_address_problem(address: str) -> str | None:
    """What is wrong with a Ray cluster address (``federation.ray_address``), or None."""
    if address == "auto":
        return None
    match = _RAY_ADDRESS.fullmatch(address)
    if match is None or not 0 < int(match["port"]) < 65536:
        return (
            f"{address!r} is not a Ray cluster address; write HOST:PORT of the head node "
            "(e.g. 10.0.0.5:6379), ray://HOST:PORT for Ray Client, or 'auto'"
        )
    return None


@dataclass(frozen=True)
class FederationConfig(_Section):
    """The federation: clients, rounds, sampling, deadlines, the aggregation rule and its
    guards, secure aggregation, and pushing each round to a running server."""

    num_clients: int = _f(4, "Simulated data-owner clients (Flower SuperNodes).")
    rounds: int = _f(3, "Federated rounds.")
    fraction_train: float = _f(1.0, "Fraction of clients sampled each round.")
    client_cpus: float = _f(1.0, "CPU cores reserved per simulated client (Ray resources).")
    client_gpus: float = _f(
        0.0, "GPUs reserved per simulated client (Ray resources; a fraction shares one GPU)."
    )
    client_memory: str = _f(
        "",
        "Memory reserved per simulated client, e.g. '2GB' (Ray's memory resource: a node "
        "hosts no more clients than fit; it must not fit fewer than its CPUs do, since Flower "
        "starts a client slot per client_cpus — checked before the first round); empty = no "
        "reservation.",
    )
    ray_address: str = _f(
        "",
        "Run the simulation on a running Ray cluster instead of starting a local Ray node: "
        "its head's 'HOST:PORT' (what `ray start --head --port=PORT` serves), "
        "'ray://HOST:PORT' (Ray Client) or 'auto' (the cluster `ray start` left on this "
        "machine); empty = local. Every Ray node must see the run folder (output_dir) at the "
        "same path, e.g. a shared volume: clients read the bundle and their data there "
        "(deploy/kuberay).",
    )
    round_timeout: float = _f(1800.0, "Seconds a round waits for replies before closing.")
    node_wait: float = _f(
        300.0,
        "Deployment: seconds `offsite run` waits for num_clients nodes to be connected to the "
        "SuperLink (heard from since it started) before the first round; then it stops with "
        "the count it saw.",
    )
    serve_url: str = _f(
        "",
        "Push each round's aggregated LoRA adapter to a running `offsite serve` at this URL "
        "(e.g. http://127.0.0.1:8000); clients then query it as model `serve_name`.",
    )
    serve_name: str = _f("federated", "Model name the pushed adapter is served under.")
    strategy: Literal["fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm"] = _f(
        "fedavg",
        "Flower strategy: 'fedavg' (the aggregate is the next global adapter), 'fedprox' "
        "(clients add proximal_mu/2 * ||w - w_global||^2 to their loss), or a server optimizer "
        "stepping on the pseudo-gradient aggregate - global: 'fedadam', 'fedyogi', "
        "'fedadagrad' (Reddi et al. 2021; server_lr, server_beta1/2, server_tau), 'fedavgm' "
        "(server_lr, server_momentum). All compose with the aggregation rule, sparse upload, "
        "secure aggregation and DP (the server step only post-processes the aggregate).",
    )
    # defaults are ServerStrategy's (offsite.federation.robust), which strategy_problems
    # compares against: one owner
    proximal_mu: float = _f(
        ServerStrategy.proximal_mu,
        "fedprox: weight mu of the clients' proximal term (must be > 0 with fedprox).",
    )
    server_lr: float = _f(
        ServerStrategy.server_lr,
        "fedadam / fedyogi / fedadagrad / fedavgm: server learning rate; 0 = Flower's default "
        f"({', '.join(f'{k} {v:g}' for k, v in DEFAULT_SERVER_LR.items())}). Adaptive "
        "optimizers move every coordinate by up to about server_lr per round: tune it "
        "(Reddi et al. search 1e-3..1).",
    )
    server_beta1: float = _f(ServerStrategy.beta1, "fedadam / fedyogi: first-moment decay.")
    server_beta2: float = _f(ServerStrategy.beta2, "fedadam / fedyogi: second-moment decay.")
    server_tau: float = _f(
        ServerStrategy.tau, "fedadam / fedyogi / fedadagrad: adaptivity (epsilon) term."
    )
    server_momentum: float = _f(
        ServerStrategy.momentum,
        "fedavgm: server momentum (> 0, or a server_lr other than 1: else it is FedAvg).",
    )
    aggregation: Literal["fedavg", "trimmed-mean", "median", "krum", "multi-krum", "bulyan"] = _f(
        "fedavg",
        "How one round's client updates combine: 'fedavg' (example-weighted mean, folded as "
        "replies arrive: coordinator memory independent of the clients per round) or a "
        "robust rule, run by Flower's strategy of that name: 'trimmed-mean' "
        "(FedTrimmedAvg, coordinate-wise, trim_fraction cut from each end), 'median' "
        "(FedMedian), 'krum' / 'multi-krum' (tolerate `byzantine` malicious clients; need "
        "clients >= 2*byzantine + 3), 'bulyan' (needs clients >= 4*byzantine + 3). Robust "
        "rules hold every update of a round in memory (see max_buffered).",
    )
    lora_aggregation: Literal["naive", "merge-exact"] = _f(
        "naive",
        "How LoRA updates combine: 'naive' (average A and B separately, as Flower does: "
        "mean(B)·mean(A) != mean(B·A) unless A is shared, so exact for train.adapter='lora-fa'), "
        "'merge-exact' (average each client's ΔW = alpha/r·B·A, fold it into the adapter "
        "blocks' base weights and start every round from a fresh LoRA: exact for any rank, "
        "train.client_ranks may differ; clients download the merged base weights each round). "
        "Composes with secure aggregation (clients then send ΔW densely), DP and robust rules "
        "(both on ΔW); not with train.upload='sparse' or federation.serve_url.",
    )
    trim_fraction: float = _f(0.1, "trimmed-mean: share of clients cut from each end.")
    byzantine: int = _f(1, "krum / multi-krum / bulyan: malicious clients to tolerate (f).")
    krum_select: int = _f(
        0, "multi-krum: updates averaged, weighted by examples (0 = clients - byzantine)."
    )
    max_buffered: int = _f(
        256,
        "Robust rules: most clients per round, since they hold every update at once (memory "
        "about 3 x clients x adapter parameters x 8 bytes at the peak); fedavg streams and "
        "ignores it.",
    )
    max_update_norm: float = _f(
        0.0, "Clip each client's update (L2 over all adapter tensors) to this norm; 0 = off."
    )
    max_examples: int = _f(
        0, "Cap on the example count a client may claim (FedAvg weights by it); 0 = off."
    )
    secure_aggregation: bool = _f(
        False,
        "Secure aggregation: clients send masked updates and the coordinator learns only their "
        "sum (pairwise X25519 masks, Shamir-shared for dropout recovery). Needs >= 3 clients "
        "per round and aggregation='fedavg'.",
    )
    secagg_threshold: int = _f(
        0,
        "Secure aggregation: clients that must stay until unmasking (more than half of those "
        "sampled); 0 = max(majority, two thirds).",
    )
    min_replies: int = _f(
        1,
        "Quorum: usable client updates a round needs; with fewer the round fails and the "
        "global adapter stays as it was.",
    )

    @property
    def sampled_clients(self) -> int:
        return max(1, round(self.num_clients * self.fraction_train))

    @property
    def aggregation_rule(self) -> AggregationRule:
        return AggregationRule(
            self.aggregation,
            self.trim_fraction,
            self.byzantine,
            self.krum_select,
            self.max_update_norm,
            self.max_examples,
            self.max_buffered,
        )

    @property
    def server_strategy(self) -> ServerStrategy:
        return ServerStrategy(
            self.strategy,
            self.proximal_mu,
            self.server_lr,
            self.server_beta1,
            self.server_beta2,
            self.server_tau,
            self.server_momentum,
        )

    def problems(self) -> list[str]:
        out = [
            f"federation: {p}" for p in rule_problems(self.aggregation_rule, self.sampled_clients)
        ]
        out += [f"federation: {p}" for p in strategy_problems(self.server_strategy)]
        if self.max_buffered < 1:
            out.append("federation.max_buffered must be >= 1")
        if self.num_clients < 1:
            out.append("federation.num_clients must be >= 1")
        if self.rounds < 1:
            out.append("federation.rounds must be >= 1")
        if not 0 < self.fraction_train <= 1:
            out.append("federation.fraction_train must be in (0, 1]")
        if self.client_cpus <= 0:
            out.append("federation.client_cpus must be > 0")
        if self.client_gpus < 0:
            out.append("federation.client_gpus must be >= 0")
        if self.client_memory:
            try:
                parse_size(self.client_memory)
            except ValueError as err:
                out.append(f"federation.client_memory: {err}")
        if self.ray_address and ray_address_problem(self.ray_address):
            out.append(f"federation.ray_address: {ray_address_problem(self.ray_address)}")
        if self.round_timeout <= 0:
            out.append("federation.round_timeout must be > 0")
        if self.node_wait < 0:
            out.append("federation.node_wait must be >= 0")
        if self.min_replies < 1:
            out.append("federation.min_replies must be >= 1")
        return out


@dataclass(frozen=True)
class PrivacyConfig(_Section):
    """Client-level differential privacy (DP-FedAvg): clipping, noise and the ε budget."""

    epsilon: float = _f(
        0.0,
        "Client-level differential privacy budget for the whole run (at privacy.delta): clients "
        "clip their update, the aggregate gets Gaussian noise, an RDP accountant reports ε "
        "after every round and stops the run before it would exceed this. 0 = DP off.",
    )
    delta: float = _f(1e-5, "δ of the (ε, δ) guarantee; keep it below 1 / number of clients.")
    clip_norm: float = _f(
        2.0,
        "Clients clip their adapter update (L2 over all tensors) to this norm; pick it near the "
        "typical update norm (2.3-4.2 per round for the default LoRA recipe, measured).",
    )
    noise_multiplier: float = _f(
        0.0,
        "Noise std ÷ clip_norm on the summed updates; 0 = the smallest that keeps ε within "
        "privacy.epsilon after federation.rounds.",
    )

    @property
    def enabled(self) -> bool:
        return self.epsilon > 0

    def problems(self) -> list[str]:
        out = []
        if self.epsilon < 0:
            out.append("privacy.epsilon must be >= 0 (0 = off)")
        if not 0 < self.delta < 1:
            out.append("privacy.delta must be in (0, 1)")
        if self.clip_norm <= 0:
            out.append("privacy.clip_norm must be > 0")
        if self.noise_multiplier < 0:
            out.append("privacy.noise_multiplier must be >= 0")
        return out


@dataclass(frozen=True)
class FaultsConfig(_Section):
    """Injected misbehaviour, for robustness tests and benchmarks only."""

    attackers: int = _f(
        0, "Clients (partition ids 0..k-1) that misbehave every round; 0 = everybody honest."
    )
    attack: Literal["scale", "sign-flip", "nan", "crash"] = _f(
        "scale",
        "What they do: 'scale' (update × attack_scale), 'sign-flip' (update × -attack_scale), "
        "'nan' (a malformed update), 'crash' (the client process fails mid-round).",
    )
    attack_scale: float = _f(50.0, "Factor for 'scale' and 'sign-flip'.")

    def problems(self) -> list[str]:
        return ["faults.attackers must be >= 0"] if self.attackers < 0 else []


@dataclass(frozen=True)
class EvalConfig(_Section):
    """The five-way evaluation on held-out data: the full-model baselines, their cache and
    scoring precision."""

    full_finetune: bool = _f(
        True,
        "Also train the same adapter recipe on the full model (the fifth row, the target the "
        "plug-in is measured against; simulations only: a deployment holds no client data); "
        "its score is cached by model, data and recipe.",
    )
    reuse_baseline: bool = _f(
        True,
        "Read the full-model baselines (full zero-shot, full fine-tuning) from the cache "
        "($OFFSITE_HOME/baselines) when the same weights, data and recipe produced them before; "
        "false recomputes them.",
    )
    batch_size: int = _f(16, "Examples per evaluation forward pass.")
    precision: Literal["auto", "fp32", "bf16"] = _f(
        "fp32",
        "Scoring precision. fp32 (default) matches lm-evaluation-harness exactly; bf16 is ~2x "
        "faster on CPUs with bf16 units but moved plug-in accuracy by ~3 points here.",
    )
    max_length: int = _f(
        1024, "Token limit when scoring (prompts longer than this are cut from the middle)."
    )

    def problems(self) -> list[str]:
        out = []
        if self.batch_size < 1:
            out.append("eval.batch_size must be >= 1")
        if self.max_length < 8:
            out.append("eval.max_length must be >= 8")
        return out


@dataclass(frozen=True)
class OffsiteConfig:
    """The whole configuration: one section per component, plus the run's seed and output."""

    seed: int = _f(0, "Seed for data splits, initialisation and sampling.")
    output_dir: str = _f("runs", "Folder under which each run gets its own sub-folder.")
    model: ModelConfig = field(default_factory=ModelConfig)
    emulator: EmulatorConfig = field(default_factory=EmulatorConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def overrides(self) -> list[str]:
        """``section.key=value`` for every setting that differs from the defaults: what to
        append to ``offsite simulate`` to run this configuration again."""
        out: list[str] = []

        def walk(mine: Mapping[str, Any], default: Mapping[str, Any], prefix: str) -> None:
            for key, value in mine.items():
                if isinstance(value, Mapping):
                    walk(value, default[key], f"{prefix}{key}.")
                elif value != default[key]:
                    literal = tomli_w.dumps({"v": value}).strip().removeprefix("v = ")
                    out.append(f"{prefix}{key}={literal}")

        walk(self.to_dict(), OffsiteConfig().to_dict(), "")
        return out


# --------------------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b=value``; the value is read as a TOML literal, else kept as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return [part.strip() for part in key.strip().split(".")], value


def _check_value(name: str, value: Any, annotation: Any) -> tuple[Any, str | None]:
    """Coerce ``value`` to ``annotation``; return (value, problem-or-None)."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            return value, f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}"
        return value, None
    if origin in (typing.Union, types.UnionType):
        return value, None
    if annotation is bool:
        if isinstance(value, bool):
            return value, None
        return value, f"{name} must be true or false, got {value!r}"
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value, None
        return value, f"{name} must be an integer, got {value!r}"
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value), None
        return value, f"{name} must be a number, got {value!r}"
    if annotation is str:
        if isinstance(value, str):
            return value, None
        return value, f"{name} must be a string, got {value!r}"
    return value, None


if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


def _build(cls: type[T], data: Mapping[str, Any], prefix: str, problems: list[str]) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            known = ", ".join(sorted(fields))
            problems.append(f"unknown key {prefix}{key!s} (known: {known})")
    kwargs: dict[str, Any] = {}
    for name in fields:
        if name not in data:
            continue
        value = data[name]
        annotation = hints[name]
        if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
            if not isinstance(value, Mapping):
                problems.append(f"{prefix}{name} must be a table")
                continue
            kwargs[name] = _build(annotation, value, f"{prefix}{name}.", problems)
            continue
        value, problem = _check_value(f"{prefix}{name}", value, annotation)
        if problem:
            problems.append(problem)
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError as err:
        problems.extend(str(err).split("; "))
        return cls()


def _merge(base: dict[str, Any], path: list[str], value: Any) -> None:
    node = base
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[path[-1]] = value


def load_config(path: Path | str | None = None, overrides: Iterable[str] = ()) -> OffsiteConfig:
    """Load defaults, then a TOML file, then ``section.key=value`` overrides; validate all."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass an existing TOML file")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {path} is not valid TOML: {err}") from err
    for text in overrides:
        keys, value = parse_override(text)
        _merge(data, keys, value)
    return config_from_dict(data)


MAX_SEED = 2**31 - 1


def config_from_dict(data: Mapping[str, Any]) -> OffsiteConfig:
    """Build and validate a config from nested tables (e.g. a run's saved ``config.toml``)."""
    problems: list[str] = []
    config = _build(OffsiteConfig, data, "", problems)
    if not problems:
        problems += _cross_section_problems(config)
    if problems:
        raise ConfigError("invalid configuration: " + "; ".join(problems))
    return config


def _cross_section_problems(config: OffsiteConfig) -> list[str]:
    """Settings that are each valid but do not work together."""
    out = []
    federation, privacy = config.federation, config.privacy
    if not 0 <= config.seed <= MAX_SEED:
        # numpy takes 32-bit seeds, and per-client seeds are derived by adding small offsets
        out.append(f"seed must be in [0, {MAX_SEED}], got {config.seed}")
    if config.train.upload == "sparse" and (federation.secure_aggregation or privacy.epsilon > 0):
        out.append(
            "train.upload='sparse' cannot be combined with secure aggregation or differential "
            "privacy: masks and noise cover every coordinate, so those updates are dense"
        )
    out += lora_aggregation_problems(config)
    if federation.min_replies > federation.sampled_clients:
        out.append(
            f"federation.min_replies={federation.min_replies} can never be met: only "
            f"{federation.sampled_clients} clients are sampled per round"
        )
    if federation.secure_aggregation:
        sampled = federation.sampled_clients
        if federation.aggregation != "fedavg":
            out.append(
                "federation.secure_aggregation hides single updates, so it works only with "
                "aggregation='fedavg' (robust rules must see each update)"
            )
        if federation.max_update_norm or federation.max_examples:
            out.append(
                "federation.max_update_norm / max_examples need to see single updates; with "
                "secure_aggregation bound updates on the clients (privacy.clip_norm)"
            )
        if sampled < 3:
            out.append(f"federation.secure_aggregation needs >= 3 clients per round, got {sampled}")
        threshold = federation.secagg_threshold
        if threshold and not sampled // 2 < threshold <= sampled:
            out.append(
                f"federation.secagg_threshold must be in ({sampled // 2}, {sampled}] for "
                f"{sampled} clients per round"
            )
    if privacy.enabled:
        from offsite.federation.dp import dp_schedule

        if federation.aggregation != "fedavg":
            out.append(
                "privacy.epsilon needs federation.aggregation='fedavg' (the noise is calibrated "
                "to the sensitivity of a sum of clipped updates)"
            )
        try:
            dp_schedule(privacy, federation)
        except ValueError as err:
            out.append(str(err))
    return out


def lora_aggregation_mode(config: OffsiteConfig, policy: str | None = None) -> str:
    """How the run combines its adapter, as reports name it: 'merge-exact', 'frozen-a' (lora-fa
    under naive averaging: exact), 'naive' (LoRA factors averaged apart: inexact) or 'tensors'
    (no LoRA: the tensors themselves are averaged, which is exact). ``policy``: the bundle's
    update policy, when it is not ``train.adapter``."""
    chosen = POLICIES[policy or config.train.adapter]
    if not chosen.lora:
        return "tensors"
    if config.federation.lora_aggregation == "merge-exact":
        return "merge-exact"
    return "frozen-a" if chosen.frozen_lora_a else "naive"


def lora_aggregation_problems(config: OffsiteConfig) -> list[str]:
    """Refusals for federation.lora_aggregation and train.client_ranks.

    Compatibility (docs/privacy.md, "Exact LoRA aggregation"):

    ============  ===========  ==========  ============  =============  ==============
    mode          secure agg.  DP          robust rules  sparse upload  client ranks
    ============  ===========  ==========  ============  =============  ==============
    naive         yes          yes         yes           yes            no (shapes)
    lora-fa       yes (exact)  yes         yes           yes (B only)   no (shapes)
    merge-exact   yes (ΔW)     yes (ΔW)    yes (on ΔW)   no             yes
    ============  ===========  ==========  ============  =============  ==============
    """
    train, federation = config.train, config.federation
    merge = federation.lora_aggregation == "merge-exact"
    out = []
    if merge and not POLICIES[train.adapter].lora:
        out.append(
            f"federation.lora_aggregation='merge-exact' merges LoRA products, but "
            f"train.adapter={train.adapter!r} trains no LoRA; use a LoRA policy or 'naive'"
        )
    if merge and train.upload == "sparse":
        out.append(
            "federation.lora_aggregation='merge-exact' restarts LoRA every round, so a sparse "
            "upload's carried residual would land on other factors; use train.upload='dense'"
        )
    if merge and federation.serve_url:
        out.append(
            "federation.serve_url pushes LoRA adapters, and a merge-exact round changes the "
            "adapter blocks' base weights; serve `offsite export`'s merged checkpoint instead"
        )
    if merge and federation.strategy in SERVER_OPTIMIZERS:
        out.append(
            f"federation.strategy={federation.strategy!r} steps on aggregate − global, and a "
            "merge-exact round draws a fresh LoRA, so that difference is noise; use "
            "federation.strategy='fedavg' or 'fedprox' with merge-exact"
        )
    if train.client_ranks and not merge:
        out.append(
            "train.client_ranks gives clients LoRA factors of different shapes, which only "
            "federation.lora_aggregation='merge-exact' can combine; set it or drop client_ranks"
        )
    return out


def describe(cls: type = OffsiteConfig, prefix: str = "") -> list[tuple[str, Any, str]]:
    """Every config key with its default and help text, for ``offsite config``."""
    rows: list[tuple[str, Any, str]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(describe(hints[f.name], f"{prefix}{f.name}."))
        else:
            rows.append((f"{prefix}{f.name}", f.default, f.metadata.get("help", "")))
    return rows
