"""The model owner's Flower ServerApp: run R rounds of FedAvg over the adapter.

It reads the run plan named in ``run_config["plan"]``, verifies the bundle, initialises the
adapter (seeded), sends clients only the trainable tensors plus the bundle digest, and saves the
global adapter after every round as ``adapters/round-<r>.safetensors`` in the run folder, with a
``rounds.json`` log of what every client reported.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from coordinator.adapters import initial_adapter_state, save_adapter
from coordinator.ledger import RoundLedger
from coordinator.progress import RoundProgress
from coordinator.push import push_adapter
from coordinator.secure_rounds import default_threshold
from coordinator.strategy import AdapterFedAvg
from emulator.bundle import bundle_arch, verify_bundle
from emulator.peft_format import write_peft_adapter
from offsite.catalog import resolve_model
from offsite.config import config_from_dict, learning_rate
from offsite.dp import dp_schedule
from offsite.runplan import RunPlan
from offsite.wire.messages import TrainInstruction

log = logging.getLogger(__name__)
app = ServerApp()


def train_config(plan: RunPlan) -> ConfigRecord:
    """The instruction every sampled node gets with the global adapter."""
    train = plan.config["train"]
    data = plan.config["data"]
    privacy = plan.config.get("privacy", {"epsilon": 0.0, "clip_norm": 0.0})
    return TrainInstruction(
        bundle_path=plan.bundle_path,
        bundle_digest=plan.bundle_digest,
        bundle_artifact=plan.bundle_artifact,
        data_dir=plan.data_dir,
        template=plan.template,
        max_words=int(data["max_words"]),
        max_length=int(data["max_length"]),
        batch_size=int(train["batch_size"]),
        local_steps=int(train["local_steps"]),
        lr=learning_rate(train),
        precision=str(train["precision"]),
        upload=str(train.get("upload", "dense")),
        upload_fraction=float(train.get("upload_fraction", 1.0)),
        memory_budget=str(train.get("memory_budget", "")),
        seed=int(plan.config["seed"]),
        # simulation: one torch thread per reserved core, so parallel clients don't thrash
        threads=max(1, int(plan.config["federation"]["client_cpus"])),
        # differential privacy: clients clip their update to this norm (0 = off)
        dp_clip=float(privacy["clip_norm"]) if float(privacy["epsilon"]) > 0 else 0.0,
        dp_noise_std=distributed_noise_std(plan),
        **fault_injection(plan),
    ).to_record()


def fault_injection(plan: RunPlan) -> dict[str, Any]:
    """Misbehaviour the run was told to inject (robustness tests and benchmarks), as
    ``TrainInstruction`` fields."""
    faults = plan.config.get("faults", {})
    if not int(faults.get("attackers", 0)):
        return {}
    return {
        "fault_attackers": int(faults["attackers"]),
        "fault_attack": str(faults["attack"]),
        "fault_scale": float(faults["attack_scale"]),
    }


def distributed_noise_std(plan: RunPlan) -> float:
    """Under secure aggregation with DP each client adds σC/√t, so any ≥ t survivors' sum
    carries at least the calibrated σC (the coordinator never sees a noise-free sum)."""
    settings = config_from_dict(plan.config)
    federation = settings.federation
    if not (settings.privacy.enabled and federation.secure_aggregation):
        return 0.0
    dp = dp_schedule(settings.privacy, federation)
    threshold = federation.secagg_threshold or default_threshold(federation.sampled_clients)
    return dp.noise_multiplier * dp.clip_norm / threshold**0.5


def _previous(path: Path, done: int) -> list[dict[str, Any]]:
    """Records (client reports, round outcomes) of the rounds a resumed run already completed."""
    if not done or not path.is_file():
        return []
    return [r for r in json.loads(path.read_text()) if int(r.get("round", 0)) <= done]


@app.main()
def main(grid: Grid, context: Context) -> None:
    plan = RunPlan.load(str(context.run_config["plan"]))
    federation = plan.config["federation"]
    run_dir = Path(plan.run_dir)
    bundle = verify_bundle(plan.bundle_path, expected_digest=plan.bundle_digest)
    total = int(federation["rounds"])
    ledger = RoundLedger.open(run_dir, plan, total)
    done = ledger.completed
    if done >= total:
        log.info("  all %d rounds are already complete", total)
        return
    if done:
        log.info("  resuming after round %d (from the run's registry)", done)
        initial = ledger.checkpoint_state(done)
    else:
        initial = initial_adapter_state(bundle, seed=int(plan.config["seed"]))
    rounds_log: list[dict[str, Any]] = _previous(run_dir / "rounds.json", done)
    earlier_outcomes = _previous(run_dir / "outcomes.json", done)
    progress = RoundProgress(total - done)

    def on_client_report(server_round: int, report: dict[str, Any]) -> None:
        rounds_log.append({"round": server_round + done, **report})
        progress.client_done(report)

    serve_url = str(federation.get("serve_url", ""))

    def after_round(flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if flower_round == 0 and done:
            return None  # the resumed-from adapter is already saved
        server_round = flower_round + done
        state = arrays.to_torch_state_dict()
        path = run_dir / "adapters" / f"round-{server_round}.safetensors"
        save_adapter(state, path)
        (run_dir / "rounds.json").write_text(json.dumps(rounds_log, indent=1))
        outcomes = [*earlier_outcomes, *strategy.round_log]
        (run_dir / "outcomes.json").write_text(json.dumps(outcomes, indent=1))
        if server_round > 0:
            outcome = strategy.round_log[-1] if strategy.round_log else {}
            ledger.close(
                server_round, path, str(outcome.get("outcome", "")), outcome.get("epsilon")
            )
            if serve_url and bundle.adapter.policy.lora:
                folder = write_peft_adapter(
                    state,
                    bundle.adapter,
                    bundle_arch(bundle),
                    str(resolve_model(str(plan.config["model"]["name"]))),
                    run_dir / "peft" / f"round-{server_round}",
                )
                push_adapter(serve_url, str(federation["serve_name"]), folder)
            progress.round_done(server_round, outcome or None)
        return None

    num_clients = int(federation["num_clients"])
    sampled = max(1, round(num_clients * float(federation["fraction_train"])))
    settings = config_from_dict(plan.config)
    dp = dp_schedule(settings.privacy, settings.federation) if settings.privacy.enabled else None
    if dp is not None:
        log.info(
            "  differential privacy: clip %.3g, noise multiplier %.3f, ε ≤ %.2f at δ=%g after "
            "%d rounds",
            dp.clip_norm,
            dp.noise_multiplier,
            dp.epsilon,
            dp.delta,
            dp.rounds,
        )
    strategy = AdapterFedAvg(
        on_client_report,
        settings.federation.aggregation_rule,
        min_replies=settings.federation.min_replies,
        dp=dp,
        secure=settings.federation.secure_aggregation,
        secure_threshold=settings.federation.secagg_threshold,
        round_offset=done,
        stage_timeout=float(federation["round_timeout"]),
        fraction_train=float(federation["fraction_train"]),
        fraction_evaluate=0.0,
        min_train_nodes=sampled,
        min_available_nodes=num_clients,
    )
    try:
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(initial),
            num_rounds=total - done,
            timeout=float(federation["round_timeout"]),
            train_config=train_config(plan),
            evaluate_fn=after_round,
        )
    finally:
        progress.close()
