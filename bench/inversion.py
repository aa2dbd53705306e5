"""How much training text an honest-but-curious coordinator recovers from one client's update.

Run: make bench-inversion   (= .venv/bin/python bench/inversion.py)

One data owner of the default run (SmolLM2-135M 2-16-2, bbc-news, client 0 of 4) trains from a
global adapter (the default LoRA recipe after one round on another client's data); the attack
(emulator/leakage.py) guesses the k tokens most likely to be in its training text from the update
of the first adapter block. Two granularities: one AdamW step on one batch (the FedSGD-like
worst case, `train.local_steps = 1`) and one default round. Views compared: the plain update
(FedAvg without secure aggregation), the clipped update (what a coordinator adding DP noise
centrally still sees) and the client's share under distributed DP with secure aggregation
(clip + N(0, (σC)²/t)) at ε ∈ {8, 4, 1}; noisy views are averaged over several noise draws.
Controls: another client's update scored against this client's tokens (word-frequency priors
alone) and pure noise (what random directions reach). Leakage is precision above the controls.
Template and special tokens are excluded. Writes bench/reports/inversion.{json,md}.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from cells import quiet_setup

REPORTS = Path(__file__).resolve().parent / "reports"
DRAWS = 5
KS = (50, 200)


def main() -> None:
    quiet_setup()
    from coordinator.models import load_full_model
    from coordinator.secure_rounds import default_threshold
    from emulator.adapter import AdapterSpec, attach_adapter
    from emulator.dp import add_gaussian_noise, clip_update
    from emulator.examples import training_batches
    from emulator.forward import pick_device, resolve_precision
    from emulator.layers import plan_layers
    from emulator.leakage import effective_updates, recovery, token_inputs, token_scores
    from emulator.split import build_emulator
    from emulator.train import train_adapter
    from offsite.config import OffsiteConfig
    from offsite.data import load_task, partition, split_holdout
    from offsite.dp import noise_for_epsilon

    start = time.perf_counter()
    config = OffsiteConfig()
    task = load_task(config.data.name)
    train, _ = split_holdout(task.examples, config.data.eval_size, config.seed)
    shares = partition(
        train, config.federation.num_clients, config.data.partition, config.data.alpha, config.seed
    )
    full, tokenizer, arch, _ = load_full_model(config.model.name)
    e = config.emulator
    plan = plan_layers(int(full.config.num_hidden_layers), e.bottom, e.top, e.keep)
    spec = AdapterSpec.for_plan("lora", plan, arch, config.train.lora_r, config.train.lora_alpha)
    device = pick_device()
    precision = resolve_precision(config.train.precision, device)
    template = config.data.template or task.template
    emulator = build_emulator(full, plan, arch)
    adapted = attach_adapter(emulator, arch, spec, plan.emulator_to_full(), seed=config.seed)
    adapted.model.to(device)

    def train_from(state: dict, index: int, steps: int) -> tuple[dict, set[int]]:
        """Client ``index`` trains ``steps`` steps from ``state``: (its update, tokens it saw)."""
        adapted.load_trainable(state)
        stream = training_batches(
            tokenizer,
            shares[index],
            template,
            max_words=config.data.max_words,
            max_length=config.data.max_length,
            batch_size=config.train.batch_size,
            seed=config.seed + index,
        )
        seen: set[int] = set()

        def recording():  # type: ignore[no-untyped-def]
            for batch in stream:
                seen.update(batch.input_ids[batch.attention_mask.bool()].tolist())
                yield batch

        torch.manual_seed(config.seed)
        train_adapter(
            adapted,
            recording(),
            steps=steps,
            lr=config.train.lr,
            precision=precision,
            device=device,
        )
        after = adapted.trainable_state()
        return {k: after[k] - state[k] for k in state}, seen

    last = config.federation.num_clients - 1
    train_from(adapted.trainable_state(), last, config.train.local_steps)
    glob = adapted.trainable_state()  # the global adapter the attacked round starts from
    inputs = token_inputs(adapted, plan.bottom[0])
    ignore = set(tokenizer(template.replace("{text}", ""))["input_ids"]) | set(
        tokenizer.all_special_ids
    )
    clip = config.privacy.clip_norm
    threshold = default_threshold(config.federation.sampled_clients)
    sigmas = {
        eps: noise_for_epsilon(eps, config.privacy.delta, 1.0, config.federation.rounds)
        for eps in (8.0, 4.0, 1.0)
    }

    def precision_at(delta: dict, used: set[int]) -> dict[int, float]:
        moved = {k: glob[k] + v for k, v in delta.items()}
        scores = token_scores(effective_updates(glob, moved, spec, plan.bottom[0]), inputs)
        return {k: recovery(scores, used, k, ignore).precision for k in KS}

    rows = []
    granularities = {
        "one step, one batch": 1,
        f"one round ({config.train.local_steps} steps)": config.train.local_steps,
    }
    meta_tokens = {}
    for granularity, steps in granularities.items():
        delta, used = train_from(glob, 0, steps)
        other, _ = train_from(glob, 1, steps)
        chance = recovery(torch.zeros(len(inputs[next(iter(inputs))])), used, 1, ignore)
        meta_tokens[granularity] = len(set(used) - ignore)
        clipped, _ = clip_update(delta, clip)
        zero = {k: torch.zeros_like(v) for k, v in delta.items()}
        views: dict[str, list[dict]] = {
            "control: another client's update": [other],
            "control: noise only (σ of ε=1 share)": [
                add_gaussian_noise(zero, sigmas[1.0] * clip / threshold**0.5) for _ in range(DRAWS)
            ],
            "plain update": [delta],
            f"clipped to {clip} (central DP)": [clipped],
            **{
                f"DP ε={eps:g} share (σ={sigma:.2f})": [
                    add_gaussian_noise(clipped, sigma * clip / threshold**0.5) for _ in range(DRAWS)
                ]
                for eps, sigma in sigmas.items()
            },
        }
        for name, draws in views.items():
            measured = [precision_at(d, used) for d in draws]
            for k in KS:
                values = [m[k] for m in measured]
                rows.append(
                    {
                        "granularity": granularity,
                        "view": name,
                        "k": k,
                        "precision": statistics.mean(values),
                        "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
                        "draws": len(values),
                        "chance_precision": chance.chance_precision,
                    }
                )
        print(f"{granularity}: done", flush=True)
    REPORTS.mkdir(parents=True, exist_ok=True)
    meta = {
        "finished": time.strftime("%Y-%m-%d %H:%M"),
        "seconds": time.perf_counter() - start,
        "client_examples": len(shares[0]),
        "distinct_tokens_trained": meta_tokens,
        "noise_draws": DRAWS,
    }
    (REPORTS / "inversion.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        "# Adapter inversion baseline",
        "",
        f"Generated {meta['finished']} by `python bench/inversion.py` "
        f"({meta['seconds']:.0f} s). Client 0 of the default run ({meta['client_examples']} "
        "examples) trains from a global adapter; distinct non-template tokens it saw: "
        + ", ".join(f"{g}: {n}" for g, n in meta_tokens.items())
        + f". Precision = share of the k guessed tokens that occur in its training text "
        f"(mean ± std over {DRAWS} noise draws for noisy views).",
        "",
        "| granularity | view of the update | k | precision | chance |",
        "|---|---|---|---|---|",
        *[
            f"| {r['granularity']} | {r['view']} | {r['k']} | {r['precision']:.2f}"
            + (f" ± {r['std']:.2f}" if r["draws"] > 1 else "")
            + f" | {r['chance_precision']:.3f} |"
            for r in rows
        ],
        "",
    ]
    (REPORTS / "inversion.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
