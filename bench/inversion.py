"""How much of a client's training data an honest-but-curious coordinator recovers from its update.

Run: make bench-inversion   (= .venv/bin/python bench/inversion.py)

Each data owner of the default run (SmolLM2-135M 2-16-2, bbc-news, 4 non-IID clients) trains
from the same global adapter (the default LoRA recipe after one round on the last client's
data) for one step on one batch (the FedSGD-like worst case, `train.local_steps = 1`) and for
one default round. Two attacks (bench/leakage.py) read the update:

- label inference: which topic rises most on public prompts → the client's majority label
  (hit rate over clients and noise draws; chance = 1 / number of labels);
- bag of words: the k tokens the first adapter block's update responds to most → precision
  against the tokens the client trained on (template and special tokens excluded). Control:
  another client's update scored against this client's tokens.

Views: the plain update (FedAvg without secure aggregation), the clipped update (what a
coordinator adding DP noise centrally still sees) and the client's share under distributed DP
with secure aggregation (clip + N(0, (σC)²/t)) at ε ∈ {8, 4, 1}, δ = 1e-5, 3 rounds; noisy views
are drawn several times. Writes bench/reports/inversion.{json,md}.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from cells import quiet_setup

REPORTS = Path(__file__).resolve().parent / "reports"
DRAWS = 5
SHUFFLES = 4  # batches attacked per client at one-step granularity
PROMPTS = 16
K = 50


def main() -> None:
    quiet_setup()
    from leakage import (
        answer_shift,
        effective_updates,
        recovery,
        token_inputs,
        token_scores,
    )

    from coordinator.federation.secure_rounds import default_threshold
    from coordinator.models import load_full_model
    from emulator.adapter import AdapterSpec, attach_adapter
    from emulator.batches import encode_pair
    from emulator.examples import training_batches
    from emulator.forward import pick_device, resolve_precision
    from emulator.layers import plan_layers
    from emulator.split import build_emulator
    from emulator.train import train_adapter
    from offsite.config import OffsiteConfig
    from offsite.data import load_task, partition, split_holdout
    from offsite.federation.dp import noise_for_epsilon
    from offsite.federation.dp.mechanism import add_gaussian_noise, clip_update
    from offsite.prompts import classification_parts, verbalize

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
    adapted = attach_adapter(
        build_emulator(full, plan, arch), arch, spec, plan.emulator_to_full(), seed=config.seed
    )
    adapted.model.to(device)

    def train_from(
        state: dict, index: int, steps: int, shuffle: int = 0
    ) -> tuple[dict, set[int], Counter]:
        """Client ``index`` trains ``steps`` steps from ``state``: its update, the tokens it
        saw and how often each answer (first answer token) occurred in its batches."""
        adapted.load_trainable(state)
        stream = training_batches(
            tokenizer,
            shares[index],
            template,
            max_words=config.data.max_words,
            max_length=config.data.max_length,
            batch_size=config.train.batch_size,
            seed=config.seed + index + 1000 * shuffle,
        )
        seen: set[int] = set()
        answers: Counter = Counter()

        def recording():
            for batch in stream:
                seen.update(batch.input_ids[batch.attention_mask.bool()].tolist())
                for row in batch.labels:
                    answers[int(row[row != -100][0])] += 1
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
        return {k: after[k] - state[k] for k in state}, seen, answers

    clients = config.federation.num_clients
    train_from(adapted.trainable_state(), clients - 1, config.train.local_steps)
    glob = adapted.trainable_state()  # the global adapter the attacked round starts from
    inputs = token_inputs(adapted, plan.bottom[0])
    ignore = set(tokenizer(template.replace("{text}", ""))["input_ids"]) | set(
        tokenizer.all_special_ids
    )
    public = [ex.completion or ex.text for ex in load_task("chitchat").examples[:PROMPTS]]
    prompts = [
        torch.tensor(
            encode_pair(
                tokenizer,
                *classification_parts(text, template, 40),
                "",
                config.data.max_length,
            )[0]
        )
        for text in public
    ]
    labels = list(task.labels)
    candidates = [
        tokenizer(verbalize(label), add_special_tokens=False)["input_ids"][0] for label in labels
    ]
    if len(set(candidates)) != len(labels):
        raise SystemExit("label inference needs label answers that start with distinct tokens")
    majority = [Counter(ex.label for ex in share).most_common(1)[0] for share in shares]
    vocab = int(inputs[next(iter(inputs))].shape[0])

    lengths = torch.tensor([len(p) for p in prompts])
    padded = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long)
    mask = torch.zeros_like(padded)
    for row, ids in enumerate(prompts):  # right padding: the answer position is lengths - 1
        padded[row, : len(ids)], mask[row, : len(ids)] = ids, 1

    @torch.no_grad()
    def answer_logits(state: dict) -> torch.Tensor:
        """[prompts, vocab] logits at the answer position with adapter ``state``."""
        adapted.load_trainable(state)
        out = adapted.model(input_ids=padded.to(device), attention_mask=mask.to(device))
        return out.logits[torch.arange(len(prompts)), lengths - 1].float().cpu()

    clip = config.privacy.clip_norm
    threshold = default_threshold(config.federation.sampled_clients)
    sigmas = {
        eps: noise_for_epsilon(eps, config.privacy.delta, 1.0, config.federation.rounds)
        for eps in (8.0, 4.0, 1.0)
    }

    def views(delta: dict) -> dict[str, list[dict]]:
        clipped, _ = clip_update(delta, clip)
        return {
            "plain update": [delta],
            f"clipped to {clip} (central DP)": [clipped],
            **{
                f"DP ε={eps:g} share (σ={sigma:.2f})": [
                    add_gaussian_noise(clipped, sigma * clip / threshold**0.5) for _ in range(DRAWS)
                ]
                for eps, sigma in sigmas.items()
            },
        }

    def bag_precision(delta: dict, used: set[int]) -> float:
        moved = {k: glob[k] + v for k, v in delta.items()}
        scores = token_scores(effective_updates(glob, moved, spec, plan.bottom[0]), inputs)
        return recovery(scores, used, K, ignore).precision

    rows: list[dict[str, Any]] = []
    chance_tokens: list[float] = []
    granularities = {  # (local steps, batches drawn per client)
        "one step, one batch": (1, SHUFFLES),
        f"one round ({config.train.local_steps} steps)": (config.train.local_steps, 1),
    }
    base = answer_logits(glob)
    for granularity, (steps, shuffles) in granularities.items():
        hits: dict[str, list[float]] = {}
        bags: dict[str, list[float]] = {}
        controls = []
        for shuffle in range(shuffles):
            updates = [train_from(glob, i, steps, shuffle) for i in range(clients)]
            for i, (delta, used, answers) in enumerate(updates):
                chance_tokens.append(recovery(torch.zeros(vocab), used, 1, ignore).chance_precision)
                controls.append(bag_precision(updates[(i + 1) % clients][0], used))
                most = max(answers.values())
                trained = {token for token, n in answers.items() if n == most}
                for name, draws in views(delta).items():
                    for draw in draws:
                        moved = {k: glob[k] + v for k, v in draw.items()}
                        rise = answer_shift(base, answer_logits(moved), candidates)
                        guess = candidates[int(rise.argmax())]
                        hits.setdefault(name, []).append(float(guess in trained))
                        bags.setdefault(name, []).append(bag_precision(draw, used))
            print(f"{granularity}: batches {shuffle + 1}/{shuffles} done", flush=True)
        rows.append(
            {
                "granularity": granularity,
                "view": "control: another client's update",
                "label_hit_rate": None,
                "bag_precision": statistics.mean(controls),
                "bag_std": statistics.pstdev(controls),
                "samples": len(controls),
            }
        )
        for name in hits:
            rows.append(
                {
                    "granularity": granularity,
                    "view": name,
                    "label_hit_rate": statistics.mean(hits[name]),
                    "bag_precision": statistics.mean(bags[name]),
                    "bag_std": statistics.pstdev(bags[name]),
                    "samples": len(hits[name]),
                }
            )
    meta = {
        "finished": time.strftime("%Y-%m-%d %H:%M"),
        "seconds": time.perf_counter() - start,
        "clients": clients,
        "majority_labels": [
            {"label": lab, "share": n / len(s)}
            for (lab, n), s in zip(majority, shares, strict=True)
        ],
        "label_chance": 1 / len(labels),
        "token_chance": statistics.mean(chance_tokens),
        "k": K,
        "noise_draws": DRAWS,
        "public_prompts": PROMPTS,
    }
    write_reports(rows, meta)


def write_reports(rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    REPORTS.mkdir(parents=True, exist_ok=True)
    (REPORTS / "inversion.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    majority = ", ".join(f"{m['label']} {100 * m['share']:.0f} %" for m in meta["majority_labels"])
    lines = [
        "# Adapter inversion baselines",
        "",
        f"Generated {meta['finished']} by `python bench/inversion.py` ({meta['seconds']:.0f} s). "
        f"{meta['clients']} clients attacked, each from the same global adapter; their majority "
        f"labels overall: {majority}. Label inference guesses the most frequent answer in the "
        f"batches the update was trained on from the answer shift on {meta['public_prompts']} "
        f"public prompts (chance ≈ {meta['label_chance']:.2f}); bag of words guesses "
        f"{meta['k']} tokens (chance precision {meta['token_chance']:.3f}). Noisy views: "
        f"{meta['noise_draws']} draws per update; one-step updates: {SHUFFLES} batches per "
        "client.",
        "",
        "| granularity | view of the update | label inference hit rate "
        "| bag-of-words precision@k |",
        "|---|---|---|---|",
    ]
    for r in rows:
        hit = "–" if r["label_hit_rate"] is None else f"{r['label_hit_rate']:.2f}"
        lines.append(
            f"| {r['granularity']} | {r['view']} | {hit} | "
            f"{r['bag_precision']:.2f} ± {r['bag_std']:.2f} |"
        )
    lines.append("")
    (REPORTS / "inversion.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # --help
    main()
