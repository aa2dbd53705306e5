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
from tqdm.auto import tqdm

from coordinator.adapters import load_adapter
from coordinator.baseline import full_fine_tune
from coordinator.baseline_cache import (
    baseline_key,
    cached_baseline,
    store_baseline,
    weights_digest,
    zero_shot_key,
)
from coordinator.evaluate import EvalSpec, four_way, score_model
from coordinator.models import check_model, load_full_model
from coordinator.report import (
    five_way_table,
    margin_lines,
    transfer_warnings,
    write_failure_report,
    write_report,
)
from coordinator.run_health import RunHealth, adapter_changed
from coordinator.simulation import run_flower_simulation
from emulator.adapter import AdapterSpec
from emulator.build import build_configured_bundle
from emulator.bundle import bundle_parts, verify_bundle
from emulator.forward import pick_device
from emulator.layers import plan_layers
from emulator.scoring import Score
from offsite.config import OffsiteConfig
from offsite.data import load_task, partition, split_holdout, write_jsonl
from offsite.errors import ConfigError
from offsite.runplan import RunPlan

if TYPE_CHECKING:
    from coordinator.deployment import Deployment

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


def new_run_dir(config: OffsiteConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    model = Path(config.model.name).name.replace("/", "-")
    data = Path(config.data.name).stem
    base = Path(config.output_dir) / f"{stamp}-{model}-{data}"
    run_dir, n = base, 1
    while run_dir.exists():
        n += 1
        run_dir = base.with_name(f"{base.name}-{n}")
    run_dir.mkdir(parents=True)
    return run_dir.resolve()


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
        )
        _, num_layers = check_model(config.model.name)
        # emulator.* must fit this model; the plan itself is chosen once the model is loaded
        plan_layers(num_layers, config.emulator.bottom, config.emulator.top, config.emulator.keep)
    if resume:
        if run_dir is None or not (run_dir / "plan.json").is_file():
            raise ConfigError(f"{run_dir} is not a run folder that can resume (no plan.json)")
        return _resume(config, run_dir.resolve(), task, held, verbose, timer, deployment)
    run_dir = run_dir.resolve() if run_dir else new_run_dir(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(config.to_toml())
    log.info("run folder: %s", run_dir)
    if deployment is None:
        for index, share in enumerate(shares):
            write_jsonl(share, run_dir / "data" / f"client-{index}.jsonl")
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
        plan, bundle = build_configured_bundle(
            full_model, tokenizer, arch, config, run_dir / "bundle"
        )
        log.info("  emulator %s, bundle %s…", plan.label, bundle.digest[:12])
        artifact = deployment.publish(bundle.path) if deployment else ""
        if artifact:
            log.info("  bundle signed and published as artifact %s…", artifact[:12])

    plan_path = run_dir / "plan.json"
    RunPlan(
        run_dir=str(run_dir),
        bundle_path=str(bundle.path),
        bundle_digest=bundle.digest,
        data_dir="" if deployment else str(run_dir / "data"),
        task_kind=task.kind,
        labels=task.labels,
        template=template,
        config=config.to_dict(),
        bundle_artifact=artifact,
    ).save(plan_path)
    return _federate_and_report(
        config,
        run_dir,
        task,
        held,
        train,
        plan,
        bundle,
        full_model,
        tokenizer,
        timer,
        verbose,
        deployment,
    )


def _resume(
    config: OffsiteConfig,
    run_dir: Path,
    task: Any,
    held: Any,
    verbose: bool,
    timer: _Timer,
    deployment: Deployment | None,
) -> SimulationResult:
    log.info("resuming run folder: %s", run_dir)
    saved = RunPlan.load(str(run_dir / "plan.json"))
    with timer.stage("load full model and verify the run's bundle"):
        full_model, tokenizer, _, _ = load_full_model(config.model.name)
        bundle = verify_bundle(saved.bundle_path, expected_digest=saved.bundle_digest)
    train, _ = split_holdout(task.examples, config.data.eval_size, config.seed)
    return _federate_and_report(
        config,
        run_dir,
        task,
        held,
        train,
        bundle.plan,
        bundle,
        full_model,
        tokenizer,
        timer,
        verbose,
        deployment,
    )


def _federate_and_report(
    config: OffsiteConfig,
    run_dir: Path,
    task: Any,
    held: Any,
    train: Any,
    plan: Any,
    bundle: Any,
    full_model: Any,
    tokenizer: Any,
    timer: _Timer,
    verbose: bool,
    deployment: Deployment | None = None,
) -> SimulationResult:
    """Federate (resuming after the last recorded round, if any), evaluate, report."""
    template = config.data.template or task.template
    adapter = bundle.adapter
    engine = "deployment" if deployment else "simulation"
    with timer.stage(f"federated training (Flower {engine})"):
        if deployment is not None:
            deployment.federate(run_dir / "plan.json", verbose=verbose)
        else:
            run_flower_simulation(
                run_dir / "plan.json",
                config.federation.num_clients,
                config.federation.client_cpus,
                verbose=verbose,
            )
        health = RunHealth.read(run_dir, config.federation.rounds)
        if not health.trained:
            error = health.failure(run_dir)
            write_failure_report(run_dir, _failure_metrics(config, run_dir, health), str(error))
            raise error
        final_path = run_dir / "adapters" / f"round-{config.federation.rounds}.safetensors"
        if not final_path.is_file():
            raise RuntimeError(
                f"the federation finished without a round-{config.federation.rounds} adapter; "
                f"no client replied in time (see {run_dir / 'rounds.json'})"
            )
        final_state = load_adapter(final_path)

    device = pick_device()
    spec = EvalSpec.from_config(config, task, held, device)
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
        weights = weights_digest(full_model)
        zero_key = zero_shot_key(weights, held, template, config)
        found = cached_baseline(zero_key) if config.eval.reuse_baseline else None
        scores = four_way(
            full_model, tokenizer, bundle, final_state, spec, bar, found[0] if found else None
        )
        if found is None:
            store_baseline(zero_key, scores["full_zero_shot"], 0.0)
        else:
            timer.note("full zero-shot", "cached")
        if full_finetune:
            scores["full_fine_tuned"] = _full_fine_tuned(
                full_model,
                weights,
                tokenizer,
                adapter,
                train,
                held,
                template,
                config,
                spec,
                bar,
                timer,
            )

    metrics = _metrics(
        config,
        run_dir,
        task,
        held,
        plan,
        bundle,
        full_model,
        final_state,
        scores,
        timer,
        "run" if deployment else "simulate",
    )
    metrics["training"] = _training(health, adapter_changed(run_dir, final_state))
    report = write_report(run_dir, metrics)
    score_dicts = metrics["scores"]
    if warning := metrics["training"]["warning"]:
        log.warning("WARNING: %s", warning)
    for text in transfer_warnings(score_dicts, metrics["training"]):
        log.warning("WARNING: %s", text)
    margins = margin_lines(score_dicts, metrics["training"])
    log.info("\n%s\n%s", five_way_table(score_dicts), "\n".join(margins))
    log.info("report: %s", report)
    return SimulationResult(run_dir, scores, report)


def _full_fine_tuned(
    full_model: Any,
    weights: str,
    tokenizer: Any,
    adapter: AdapterSpec,
    train: Any,
    held: Any,
    template: str,
    config: OffsiteConfig,
    spec: EvalSpec,
    bar: Any,
    timer: _Timer,
) -> Score:
    """The fifth row: read from the baseline cache, or trained, scored and cached."""
    key = baseline_key(weights, adapter, train, held, template, config)
    found = cached_baseline(key) if config.eval.reuse_baseline else None
    if found is not None:
        score, seconds = found
        bar.update(len(held))
        timer.note("full fine-tuning baseline", f"cached ({seconds:.0f} s when computed)")
        log.info("  full fine-tuning: cached score (key %s…, took %.0f s)", key[:12], seconds)
        return score
    start = time.perf_counter()
    bar.set_postfix_str("full fine-tuning (baseline)")
    tuned = full_fine_tune(full_model, tokenizer, adapter, train, template, config, spec.device)
    bar.set_postfix_str("full fine-tuned")
    score = score_model(tuned, tokenizer, spec, bar.update)
    seconds = time.perf_counter() - start
    store_baseline(key, score, seconds)
    timer.note("full fine-tuning baseline", f"computed in {seconds:.0f} s, cached")
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


def _failure_metrics(config: OffsiteConfig, run_dir: Path, health: RunHealth) -> dict[str, Any]:
    import json

    outcomes_path = run_dir / "outcomes.json"
    return {
        "run": {"model": config.model.name, "data": config.data.name, "failed": True},
        "training": _training(health, changed=False),
        "outcomes": json.loads(outcomes_path.read_text()) if outcomes_path.is_file() else [],
        "config": config.to_dict(),
    }


def _metrics(
    config: OffsiteConfig,
    run_dir: Path,
    task: Any,
    held: Any,
    plan: Any,
    bundle: Any,
    full_model: Any,
    final_state: dict[str, torch.Tensor],
    scores: dict[str, Score],
    timer: _Timer,
    verb: str = "simulate",
) -> dict[str, Any]:
    import json

    rounds_path = run_dir / "rounds.json"
    rounds = json.loads(rounds_path.read_text()) if rounds_path.is_file() else []
    outcomes_path = run_dir / "outcomes.json"
    outcomes = json.loads(outcomes_path.read_text()) if outcomes_path.is_file() else []
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
            "num_clients": config.federation.num_clients,
            "rounds": config.federation.rounds,
            "full_params": sum(p.numel() for p in full_model.parameters()),
            "full_model_bytes": bundle.manifest.get("privacy", {}).get("full_model_bytes"),
            "bundle_bytes": sum(int(f["size"]) for f in bundle.manifest["files"].values()),
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
