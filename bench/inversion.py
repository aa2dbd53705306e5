"""How much training text an honest-but-curious coordinator recovers from one client's update.

Run: make bench-inversion   (= .venv/bin/python bench/inversion.py)

One data owner of the default run (SmolLM2-135M 2-16-2, bbc-news, client 0 of 4) trains one
round of the default LoRA recipe; the attack (emulator/leakage.py) guesses the k tokens most
likely to be in its training text from the update of the first adapter block. Views compared:
the plain update (FedAvg without secure aggregation), the clipped update (what a coordinator
adding DP noise centrally still sees), and the client's share under distributed DP with secure
aggregation (clip + N(0, (σC)²/t)) at ε ∈ {8, 4, 1}. Template and special tokens are excluded.
The control scores another client's update against this client's tokens: what the attack
reaches without any leakage (word-frequency priors); leakage is precision above the control.
Writes bench/reports/inversion.{json,md}.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from cells import quiet_setup

REPORTS = Path(__file__).resolve().parent / "reports"


def main() -> None:
    quiet_setup()
    from coordinator.models import load_full_model
    from coordinator.secure_rounds import default_threshold
    from emulator.adapter import AdapterSpec, attach_adapter
    from emulator.dp import add_gaussian_noise, clip_update
    from emulator.examples import training_batches
    from emulator.forward import pick_device, resolve_precision
    from emulator.layers import plan_layers
    from emulator.leakage import effective_updates, recovery, token_scores
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
    template = config.data.template or task.template

    def client_update(index: int) -> tuple[dict, dict, set[int]]:
        """(global adapter, this client's trained adapter, token ids it trained on)."""
        emulator = build_emulator(full, plan, arch)
        adapted = attach_adapter(emulator, arch, spec, plan.emulator_to_full(), seed=config.seed)
        adapted.model.to(device)
        start_state = adapted.trainable_state()
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
            steps=config.train.local_steps,
            lr=config.train.lr,
            precision=resolve_precision(config.train.precision, device),
            device=device,
        )
        return start_state, adapted.trainable_state(), seen

    before, after, used = client_update(0)
    _, other_after, _ = client_update(1)
    embeddings = full.get_input_embeddings().weight.detach().cpu()
    ignore = set(tokenizer(template.replace("{text}", ""))["input_ids"]) | set(
        tokenizer.all_special_ids
    )
    delta = {k: after[k] - before[k] for k in after}
    norm = float(torch.sqrt(sum(v.double().pow(2).sum() for v in delta.values())))
    clip = config.privacy.clip_norm
    clipped, _ = clip_update(delta, clip)
    views = {
        "control: another client's plain update": {k: other_after[k] - before[k] for k in after},
        "plain update": delta,
        f"clipped to {clip}": clipped,
    }
    sampled = config.federation.sampled_clients
    threshold = default_threshold(sampled)
    noise = {}
    for target in (8.0, 4.0, 1.0):
        sigma = noise_for_epsilon(target, config.privacy.delta, 1.0, config.federation.rounds)
        noise[target] = sigma
        views[f"DP ε={target:g} share (σ={sigma:.2f})"] = add_gaussian_noise(
            clipped, sigma * clip / threshold**0.5
        )
    rows = []
    for name, view in views.items():
        moved = {k: before[k] + v for k, v in view.items()}
        scores = token_scores(effective_updates(before, moved, spec, plan.bottom[0]), embeddings)
        for k in (50, 200):
            rows.append({"view": name, **recovery(scores, used, k, ignore).to_dict()})
    REPORTS.mkdir(parents=True, exist_ok=True)
    meta = {
        "finished": time.strftime("%Y-%m-%d %H:%M"),
        "seconds": time.perf_counter() - start,
        "client_examples": len(shares[0]),
        "distinct_tokens_trained": len(set(used) - ignore),
        "update_norm": norm,
    }
    (REPORTS / "inversion.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        "# Adapter inversion baseline",
        "",
        f"Generated {meta['finished']} by `python bench/inversion.py` "
        f"({meta['seconds']:.0f} s). Client 0 of the default run: {meta['client_examples']} "
        f"examples, {meta['distinct_tokens_trained']} distinct non-template tokens in the "
        f"batches of one round; update L2 norm {norm:.2f}.",
        "",
        "| view of the update | k | precision | recall | chance precision |",
        "|---|---|---|---|---|",
        *[
            f"| {r['view']} | {r['k']} | {r['precision']:.2f} | {r['recall']:.3f} | "
            f"{r['chance_precision']:.3f} |"
            for r in rows
        ],
        "",
    ]
    (REPORTS / "inversion.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
