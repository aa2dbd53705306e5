"""``offsite simulate``: one federated offsite-tuning run, top to bottom.

setup (data split, full model, emulator bundle) → federated training on Flower's simulation engine
→ five-way evaluation on held-out data → report (Markdown, JSON, plots) in the run folder.
"""

from __future__ import annotations

import logging
import shlex
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from coordinator.evaluation.baseline import full_fine_tune
from coordinator.evaluation.baseline_cache import (
    baseline_key,
    cached_baseline,
    store_baseline,
    weights_digest,
    zero_shot_key,
)
from coordinator.evaluation.five_way import EvalSpec, four_way, score_model
from coordinator.evaluation.report import (
    five_way_table,
    margin_lines,
    transfer_warnings,
    write_failure_report,
    write_report,
)
from coordinator.federation.merge_exact import round_transfer_bytes
from coordinator.federation.simulation import RayEngine, check_reachable, run_flower_simulation
from coordinator.models import check_model, load_full_model
from coordinator.state.adapters import load_adapter
from coordinator.state.folder import RunFolder
from coordinator.state.health import RunHealth, adapter_changed
from coordinator.state.plan import RunPlan
from coordinator.workflow.bundle_cache import reuse_or_build
from emulator.bundle import Bundle, bundle_parts
from emulator.forward import pick_device
from emulator.layers import LayerPlan, plan_layers
from emulator.scoring import Score
from emulator.tokenizers import Tokenizer
from offsite.config import OffsiteConfig, lora_aggregation_mode
from offsite.data import Example, Task, load_task, partition, split_holdout, write_jsonl
from offsite.errors import ConfigError

if TYPE_CHECKING:
    from coordinator.workflow.deployment import Deployment

log = logging.getLogger(__name__)


@dataclass
class SimulationResult:
    run_dir: Path
    scores: dict[str, Score]
    report: Path


class _Timer:
    def __init__(self) -> None:
        self.stages: dict[str, float] = {}
        self.notes: dict[str, str] = {}  # what a stage's time does not say (e.g. a cache hit)

    def note(self, name: str, text: str) -> None:
        self.notes[name] = text

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        log.info("▸ %s", name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = time.perf_counter() - start


@dataclass
class _Run:
    """One run between setup and report: what federating, evaluating and reporting need."""

    config: OffsiteConfig
    folder: RunFolder
    task: Task
    held: list[Example]
    train: list[Example]
    plan: LayerPlan
    bundle: Bundle
    full_model: nn.Module
    tokenizer: Tokenizer  # a transformers tokenizer
    weights: str  # the full model's weights digest (baseline_cache.weights_digest), hashed once
    timer: _Timer
    verbose: bool
    deployment: Deployment | None


def simulate(
    config: OffsiteConfig,
    run_dir: Path | None = None,
    verbose: bool = False,
    resume: bool = False,
    deployment: Deployment | None = None,
) -> SimulationResult:
    """Run a full federated offsite-tuning simulation and write its report.

    ``resume`` continues the run in ``run_dir`` (data, bundle and plan reused) after its last
    round recorded in the run's registry, then evaluates and reports as usual. With
    ``deployment`` the rounds run on the coordinator's SuperLink and its enrolled nodes, which
    train on their own data, instead of on the simulation engine with shares of ``data``.
    """
    timer = _Timer()
    # Fail fast, before anything is written: data readable and large enough, model present,
    # architecture known.
    with timer.stage("prepare data"):
        task = load_task(config.data.name, config.data.text_field, config.data.label_field)
        template = config.data.template or task.template
        train, held = split_holdout(task.examples, config.data.eval_size, config.seed)
        shares = partition(
            train,
            config.federation.num_clients,
            config.data.partition,
            config.data.alpha,
            config.seed,
            config.data.quantity_alpha,
        )
        _, num_layers = check_model(config.model.name)
        # emulator.* must fit this model; the plan itself is chosen once the model is loaded
        plan_layers(num_layers, config.emulator.bottom, config.emulator.top, config.emulator.keep)
        if deployment is None and config.federation.ray_address not in ("", "auto"):
            check_reachable(config.federation.ray_address)  # before minutes of bundle building
    if resume:
        folder = RunFolder(run_dir.resolve()) if run_dir is not None else None
        if folder is None or not folder.can_resume:
            raise ConfigError(f"{run_dir} is not a run folder that can resume (no plan.json)")
        return _resume(config, folder, task, held, train, verbose, timer, deployment)
    folder = RunFolder.at(run_dir) if run_dir else RunFolder.new(config)
    folder.write_config(config)
    log.info("run folder: %s", folder.path)
    if deployment is None:
        for index, share in enumerate(shares):
            write_jsonl(share, folder.client_data(index))
        log.info(
            "  %s: %d examples (%s), %d held out, clients get %s",
            task.name,
            len(task.examples),
            task.kind,
            len(held),
            [len(s) for s in shares],
        )
    else:
        log.info(
            "  %s: %d held out for evaluation; nodes train on their own data", task.name, len(held)
        )

    with timer.stage("load full model and build emulator bundle"):
        full_model, tokenizer, arch, _ = load_full_model(config.model.name)
        weights = weights_digest(full_model)  # building the bundle leaves the weights as they are
        plan, bundle, cached = reuse_or_build(
            full_model, tokenizer, arch, config, folder.bundle_dir, weights
        )
        if cached:
            timer.note("emulator bundle", "cached (emulator.reuse_bundle)")
        log.info(
            "  emulator %s, bundle %s…%s",
            plan.label,
            bundle.digest[:12],
            " (cached)" if cached else "",
        )
        artifact = deployment.publish(bundle.path).artifact if deployment else ""
        if artifact:
            log.info("  bundle signed and published as artifact %s…", artifact[:12])

    folder.save_plan(
        RunPlan(
            run_dir=str(folder.path),
            bundle_path=str(bundle.path),
            bundle_digest=bundle.digest,
            data_dir="" if deployment else str(folder.data_dir),
            task_kind=task.kind,
            labels=task.labels,
            template=template,
            bundle_artifact=artifact,
            registry=deployment.registry if deployment else "",
        )
    )
    run = _Run(
        config,
        folder,
        task,
        held,
        train,
        plan,
        bundle,
        full_model,
        tokenizer,
        weights,
        timer,
        verbose,
        deployment,
    )
    return _federate_and_report(run)


def _resume(
    config: OffsiteConfig,
    folder: RunFolder,
    task: Task,
    held: list[Example],
    train: list[Example],
    verbose: bool,
    timer: _Timer,
    deployment: Deployment | None,
) -> SimulationResult:
    log.info("resuming run folder: %s", folder.path)
    with timer.stage("load full model and verify the run's bundle"):
        full_model, tokenizer, _, _ = load_full_model(config.model.name)
        weights = weights_digest(full_model)
        bundle = folder.bundle()
    run = _Run(
        config,
        folder,
        task,
        held,
        train,
        bundle.plan,
        bundle,
        full_model,
        tokenizer,
        weights,
        timer,
        verbose,
        deployment,
    )
    return _federate_and_report(run)


def _federate_and_report(run: _Run) -> SimulationResult:
    """Federate (resuming after the last recorded round, if any), evaluate, report."""
    config, folder, timer, deployment = run.config, run.folder, run.timer, run.deployment
    template = config.data.template or run.task.template
    engine = "deployment" if deployment else "simulation"
    with timer.stage(f"federated training (Flower {engine})"):
        if deployment is not None:
            deployment.federate(folder, verbose=run.verbose)
        else:
            run_flower_simulation(
                folder.plan_path,
                config.federation.num_clients,
                verbose=run.verbose,
                engine=RayEngine.from_config(config.federation),
            )
        health = RunHealth.read(folder, config.federation.rounds)
        if not health.trained:
            error = health.failure(folder)
            write_failure_report(folder, _failure_metrics(config, folder, health), str(error))
            raise error
        final_path = folder.adapter_path(config.federation.rounds)
        if not final_path.is_file():
            raise RuntimeError(
                f"the federation finished without a round-{config.federation.rounds} adapter; "
                f"no client replied in time (see {folder.client_reports_path})"
            )
        final_state = load_adapter(final_path)

    device = pick_device()
    held = run.held
    spec = EvalSpec.from_config(config, run.task, held, device)
    # Full fine-tuning trains on the clients' data: a simulation holds it, a deployment's
    # coordinator never does (its own examples are another data set), so it has no fifth row.
    full_finetune = config.eval.full_finetune and deployment is None
    if config.eval.full_finetune and deployment is not None:
        timer.note("full fine-tuning baseline", "skipped: a deployment never holds client data")
    settings = 5 if full_finetune else 4
    with (
        timer.stage("five-way evaluation"),
        tqdm(total=settings * len(held), desc="evaluating", unit="ex", dynamic_ncols=True) as bar,
    ):
        zero_key = zero_shot_key(run.weights, held, template, config)
        found = cached_baseline(zero_key) if config.eval.reuse_baseline else None
        scores = four_way(
            run.full_model,
            run.tokenizer,
            run.bundle,
            final_state,
            spec,
            bar,
            found[0] if found else None,
        )
        if found is None:
            store_baseline(zero_key, scores["full_zero_shot"], 0.0)
        else:
            timer.note("full zero-shot", "cached")
        if full_finetune:
            scores["full_fine_tuned"] = _full_fine_tuned(run, template, spec, bar)

    metrics = _metrics(run, final_state, scores, "run" if deployment else "simulate")
    metrics["training"] = _training(health, adapter_changed(folder, final_state))
    report = write_report(folder, metrics)
    score_dicts = metrics["scores"]
    if warning := metrics["training"]["warning"]:
        log.warning("WARNING: %s", warning)
    for text in transfer_warnings(score_dicts, metrics["training"]):
        log.warning("WARNING: %s", text)
    margins = margin_lines(score_dicts, metrics["training"])
    log.info("\n%s\n%s", five_way_table(score_dicts), "\n".join(margins))
    log.info("report: %s", report)
    return SimulationResult(folder.path, scores, report)


def _full_fine_tuned(run: _Run, template: str, spec: EvalSpec, bar: tqdm[Any]) -> Score:
    """The fifth row: read from the baseline cache, or trained, scored and cached."""
    config, held, adapter = run.config, run.held, run.bundle.adapter
    key = baseline_key(run.weights, adapter, run.train, held, template, config)
    found = cached_baseline(key) if config.eval.reuse_baseline else None
    if found is not None:
        score, seconds = found
        bar.update(len(held))
        run.timer.note("full fine-tuning baseline", f"cached ({seconds:.0f} s when computed)")
        log.info("  full fine-tuning: cached score (key %s…, took %.0f s)", key[:12], seconds)
        return score
    start = time.perf_counter()
    bar.set_postfix_str("full fine-tuning (baseline)")
    tuned = full_fine_tune(
        run.full_model, run.tokenizer, adapter, run.train, template, config, spec.device
    )
    bar.set_postfix_str("full fine-tuned")
    score = score_model(tuned, run.tokenizer, spec, bar.update)
    seconds = time.perf_counter() - start
    store_baseline(key, score, seconds)
    run.timer.note("full fine-tuning baseline", f"computed in {seconds:.0f} s, cached")
    return score


def _training(health: RunHealth, changed: bool) -> dict[str, Any]:
    """What the report and the CLI say about how training went."""
    return {
        "warning": health.warning(),
        "aggregated_rounds": health.aggregated,
        "failed_rounds": [{"round": r, "outcome": v} for r, v in health.failed_rounds],
        "client_failures": [f.describe() for f in health.client_failures],
        "adapter_changed": changed,
    }


def _failure_metrics(config: OffsiteConfig, folder: RunFolder, health: RunHealth) -> dict[str, Any]:
    return {
        "run": {"model": config.model.name, "data": config.data.name, "failed": True},
        "training": _training(health, changed=False),
        "outcomes": folder.outcomes(),
        "config": config.to_dict(),
    }


def _metrics(
    run: _Run,
    final_state: dict[str, torch.Tensor],
    scores: dict[str, Score],
    verb: str = "simulate",
) -> dict[str, Any]:
    config, task, held, plan, bundle = run.config, run.task, run.held, run.plan, run.bundle
    full_model, timer = run.full_model, run.timer
    rounds = run.folder.client_reports()
    outcomes = run.folder.outcomes()
    middle_total = plan.num_layers - len(plan.adapter_layers)
    return {
        "run": {
            "model": config.model.name,
            "data": task.name,
            "task_kind": task.kind,
            "labels": list(task.labels),
            "eval_examples": len(held),
            "plan": plan.label,
            "adapter": config.train.adapter,
            "lora_aggregation": lora_aggregation_mode(config),
            **round_transfer_bytes(final_state, config.federation.secure_aggregation),
            "num_clients": config.federation.num_clients,
            "rounds": config.federation.rounds,
            "full_params": sum(p.numel() for p in full_model.parameters()),
            "full_model_bytes": bundle.manifest.get("privacy", {}).get("full_model_bytes"),
            "bundle_bytes": bundle.nbytes,
            "bundle_parts": bundle_parts(bundle.manifest),
            "bundle_digest": bundle.digest,
            "adapter_bytes": sum(t.numel() * t.element_size() for t in final_state.values()),
            "middle_kept": len(plan.middle_kept),
            "middle_total": middle_total,
            "middle_dropped": middle_total - len(plan.middle_kept),
            "privacy": bundle.manifest.get("privacy", {}),
            "compression": bundle.manifest.get("compression", {}),
            "command": " ".join(["offsite", verb, *(shlex.quote(o) for o in config.overrides())]),
        },
        "scores": {
            key: {"metric": s.metric, "value": s.value, "nll": s.nll, "count": s.count}
            for key, s in scores.items()
        },
        "rounds": rounds,
        "outcomes": outcomes,
        "timings": {k: round(v, 2) for k, v in timer.stages.items()},
        "notes": dict(timer.notes),
        "config": config.to_dict(),
    }
