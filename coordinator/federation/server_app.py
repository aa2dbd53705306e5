"""The model owner's Flower ServerApp: run R rounds of the configured strategy over the adapter.

It reads the run plan named in ``run_config["plan"]`` and the run's configuration beside it,
verifies the bundle, initialises the adapter (seeded), sends clients only the trainable tensors
plus the bundle digest, and saves the global adapter after every round in the run folder, with a
log of what every client reported and each round's verdict (``coordinator.state.folder``).
With ``federation.lora_aggregation = "merge-exact"`` the adapter also carries the LoRA modules'
base weights, and ``coordinator.federation.merge_exact`` combines the rounds.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from coordinator.federation.merge_exact import MergeExact
from coordinator.federation.progress import RoundProgress
from coordinator.federation.push import push_adapter
from coordinator.federation.secure_rounds import default_threshold
from coordinator.federation.strategy import RoundSettings, make_strategy
from coordinator.federation.streaming import StreamingGrid
from coordinator.state.adapters import initial_adapter_state, save_adapter
from coordinator.state.folder import RunFolder
from coordinator.state.ledger import RoundLedger
from coordinator.state.plan import RunPlan
from emulator.bundle import Bundle, bundle_arch
from emulator.peft_format import write_peft_adapter
from offsite.catalog import resolve_model
from offsite.config import OffsiteConfig, learning_rate, lora_aggregation_mode
from offsite.federation.dp import dp_schedule
from offsite.wire.messages import TrainInstruction

log = logging.getLogger(__name__)
app = ServerApp()


def train_config(plan: RunPlan, config: OffsiteConfig) -> ConfigRecord:
    """The instruction every sampled node gets with the global adapter."""
    train, privacy = config.train, config.privacy
    return TrainInstruction(
        bundle_path=plan.bundle_path,
        bundle_digest=plan.bundle_digest,
        bundle_artifact=plan.bundle_artifact,
        data_dir=plan.data_dir,
        template=plan.template,
        max_words=config.data.max_words,
        max_length=config.data.max_length,
        batch_size=train.batch_size,
        local_steps=train.local_steps,
        lr=learning_rate(train),
        precision=train.precision,
        upload=train.upload,
        upload_fraction=train.upload_fraction,
        memory_budget=train.memory_budget,
        seed=config.seed,
        lora_aggregation=config.federation.lora_aggregation,
        client_ranks=train.client_ranks,
        # simulation: one torch thread per reserved core, so parallel clients don't thrash
        threads=max(1, int(config.federation.client_cpus)),
        # differential privacy: clients clip their update to this norm (0 = off)
        dp_clip=privacy.clip_norm if privacy.epsilon > 0 else 0.0,
        dp_noise_std=distributed_noise_std(config),
        # FedProx: the clients' proximal term (0 unless federation.strategy is 'fedprox')
        proximal_mu=config.federation.proximal_mu,
        **fault_injection(config),
    ).to_record()


def fault_injection(config: OffsiteConfig) -> dict[str, Any]:
    """Misbehaviour the run was told to inject (robustness tests and benchmarks), as
    ``TrainInstruction`` fields."""
    faults = config.faults
    if not faults.attackers:
        return {}
    return {
        "fault_attackers": faults.attackers,
        "fault_attack": faults.attack,
        "fault_scale": faults.attack_scale,
    }


def distributed_noise_std(config: OffsiteConfig) -> float:
    """Under secure aggregation with DP each client adds σC/√t, so any ≥ t survivors' sum
    carries at least the calibrated σC (the coordinator never sees a noise-free sum)."""
    federation = config.federation
    if not (config.privacy.enabled and federation.secure_aggregation):
        return 0.0
    dp = dp_schedule(config.privacy, federation)
    threshold = federation.secagg_threshold or default_threshold(federation.sampled_clients)
    root: float = threshold**0.5  # typeshed types int ** float as Any
    return dp.noise_multiplier * dp.clip_norm / root


def merge_exact(config: OffsiteConfig, bundle: Bundle) -> MergeExact | None:
    """The run's merge-exact aggregation, or None for naive averaging."""
    if config.federation.lora_aggregation != "merge-exact":
        return None
    arch = bundle_arch(bundle)
    return MergeExact(bundle.adapter.lora_alpha, config.seed, arch.lora_fan_in_fan_out)


def _up_to(records: list[dict[str, Any]], done: int) -> list[dict[str, Any]]:
    """Records (client reports, round outcomes) of the rounds a resumed run already completed."""
    return [r for r in records if int(r.get("round", 0)) <= done] if done else []


@app.main()
def main(grid: Grid, context: Context) -> None:
    plan = RunPlan.load(str(context.run_config["plan"]))
    folder = RunFolder(Path(plan.run_dir))
    config = folder.config()
    federation = config.federation
    bundle = folder.bundle()
    total = federation.rounds
    ledger = RoundLedger.open(folder, plan, config)
    done = ledger.completed
    if done >= total:
        log.info("  all %d rounds are already complete", total)
        return
    if done:
        log.info("  resuming after round %d (from the run's registry)", done)
        initial = ledger.checkpoint_state(done)
    else:
        merging = federation.lora_aggregation == "merge-exact"
        initial = initial_adapter_state(bundle, seed=config.seed, lora_bases=merging)
    rounds_log = _up_to(folder.client_reports(), done)
    earlier_outcomes = _up_to(folder.outcomes(), done)
    progress = RoundProgress(total - done)

    def on_client_report(server_round: int, report: dict[str, Any]) -> None:
        rounds_log.append({"round": server_round + done, **report})
        progress.client_done(report)

    def after_round(flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if flower_round == 0 and done:
            return None  # the resumed-from adapter is already saved
        server_round = flower_round + done
        state = arrays.to_torch_state_dict()
        path = folder.adapter_path(server_round)
        save_adapter(state, path)
        folder.write_client_reports(rounds_log)
        mode = {"lora_aggregation": lora_aggregation_mode(config, bundle.adapter.kind)}
        folder.write_outcomes([*earlier_outcomes, *({**o, **mode} for o in strategy.round_log)])
        if server_round > 0:
            outcome = strategy.round_log[-1] if strategy.round_log else {}
            ledger.close(
                server_round, path, str(outcome.get("outcome", "")), outcome.get("epsilon")
            )
            if federation.serve_url and bundle.adapter.policy.lora:
                peft = write_peft_adapter(
                    state,
                    bundle.adapter,
                    bundle_arch(bundle),
                    str(resolve_model(config.model.name)),
                    folder.peft_dir(server_round),
                )
                push_adapter(federation.serve_url, federation.serve_name, peft)
            progress.round_done(server_round, outcome or None)
        return None

    sampled = federation.sampled_clients
    dp = dp_schedule(config.privacy, federation) if config.privacy.enabled else None
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
    strategy = make_strategy(
        federation.server_strategy,
        on_client_report,
        federation.aggregation_rule,
        RoundSettings(
            min_replies=federation.min_replies,
            dp=dp,
            secure=federation.secure_aggregation,
            secure_threshold=federation.secagg_threshold,
            round_offset=done,
            merge=merge_exact(config, bundle),
            frozen=bundle.adapter.policy.frozen,
            stage_timeout=federation.round_timeout,
        ),
        fraction_train=federation.fraction_train,
        fraction_evaluate=0.0,
        min_train_nodes=sampled,
        min_available_nodes=federation.num_clients,
    )
    try:
        strategy.start(
            grid=StreamingGrid(grid),  # replies are folded as they arrive
            initial_arrays=ArrayRecord(initial),
            num_rounds=total - done,
            timeout=federation.round_timeout,
            train_config=train_config(plan, config),
            evaluate_fn=after_round,
        )
    finally:
        progress.close()
