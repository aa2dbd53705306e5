"""The inversion baseline finds training tokens in a plain update and loses them under DP noise."""

from __future__ import annotations

import torch

from emulator.adapter import AdapterSpec, attach_adapter
from emulator.arch import arch_spec
from emulator.dp import add_gaussian_noise, clip_update
from emulator.examples import training_batches
from emulator.layers import plan_layers
from emulator.leakage import effective_updates, recovery, token_scores
from emulator.split import build_emulator
from emulator.train import train_adapter
from offsite.data import Example
from tests.conftest import LABELS, tiny_model, tiny_texts


def _client_update(tokenizer, kind: str):  # type: ignore[no-untyped-def]
    full = tiny_model("llama")
    arch = arch_spec(full.config)
    plan = plan_layers(6, 1, 1, 2)
    spec = AdapterSpec.for_plan(kind, plan, arch, 4, 8)
    adapted = attach_adapter(build_emulator(full, plan, arch), arch, spec, plan.emulator_to_full())
    before = adapted.trainable_state()
    examples = [Example(t, label=LABELS[0]) for t in tiny_texts(LABELS[0], 12, seed=3)]
    stream = training_batches(
        tokenizer,
        examples,
        "Text: {text}\nTopic:",
        max_words=10,
        max_length=48,
        batch_size=6,
        seed=0,
    )
    used: set[int] = set()

    def recording():  # type: ignore[no-untyped-def]
        for batch in stream:
            used.update(batch.input_ids[batch.attention_mask.bool()].tolist())
            yield batch

    torch.manual_seed(0)
    train_adapter(
        adapted, recording(), steps=8, lr=2e-2, precision="fp32", device=torch.device("cpu")
    )
    embeddings = full.get_input_embeddings().weight.detach()
    return before, adapted.trainable_state(), spec, used, embeddings


def test_plain_update_reveals_training_tokens_and_noise_hides_them(tokenizer) -> None:  # type: ignore[no-untyped-def]
    for kind in ("lora", "full"):
        before, after, spec, used, embeddings = _client_update(tokenizer, kind)
        k = 20
        plain = recovery(
            token_scores(effective_updates(before, after, spec, 0), embeddings), used, k
        )
        assert plain.precision > 2 * plain.chance_precision, (kind, plain)

        delta = {name: after[name] - before[name] for name in after}
        clipped, _ = clip_update(delta, 0.1)
        noisy_after = {
            name: before[name] + value
            for name, value in add_gaussian_noise(clipped, 0.1 * 4.0).items()
        }
        noisy = recovery(
            token_scores(effective_updates(before, noisy_after, spec, 0), embeddings), used, k
        )
        assert noisy.precision < plain.precision, (kind, plain, noisy)
        assert noisy.precision < 1.6 * noisy.chance_precision + 0.1, (kind, noisy)
