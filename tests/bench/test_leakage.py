"""The inversion baseline finds training tokens in a plain update and loses them under DP noise."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from emulator.adapter import AdapterSpec, attach_adapter
from emulator.arch import arch_spec
from emulator.examples import training_batches
from emulator.layers import plan_layers
from emulator.split import build_emulator
from emulator.train import train_adapter
from offsite.data import Example
from offsite.federation.dp.mechanism import add_gaussian_noise, clip_update
from tests.conftest import LABELS, tiny_model, tiny_texts

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))  # a benchmark's attack

from leakage import effective_updates, recovery, token_inputs, token_scores


def _client_update(tokenizer, kind: str):
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

    def recording():
        for batch in stream:
            used.update(batch.input_ids[batch.attention_mask.bool()].tolist())
            yield batch

    torch.manual_seed(0)
    train_adapter(
        adapted, recording(), steps=8, lr=2e-2, precision="fp32", device=torch.device("cpu")
    )
    return before, adapted.trainable_state(), spec, used, token_inputs(adapted, 0)


def test_plain_update_reveals_training_tokens_and_noise_hides_them(tokenizer) -> None:
    for kind in ("lora", "full"):
        before, after, spec, used, inputs = _client_update(tokenizer, kind)
        k = 20
        plain = recovery(token_scores(effective_updates(before, after, spec, 0), inputs), used, k)
        assert plain.precision > 2 * plain.chance_precision, (kind, plain)

        delta = {name: after[name] - before[name] for name in after}
        clipped, _ = clip_update(delta, 0.1)
        # one noise draw hits 4 of 20 tokens by luck now and then: judge the mean of five
        draws = []
        for seed in range(5):
            noise = torch.Generator().manual_seed(seed)
            noisy_after = {
                name: before[name] + value
                for name, value in add_gaussian_noise(clipped, 0.1 * 4.0, noise).items()
            }
            draws.append(
                recovery(
                    token_scores(effective_updates(before, noisy_after, spec, 0), inputs), used, k
                )
            )
        noisy_precision = sum(d.precision for d in draws) / len(draws)
        chance = draws[0].chance_precision
        assert noisy_precision < plain.precision, (kind, plain, draws)
        assert noisy_precision < 1.6 * chance + 0.1, (kind, draws)


def test_token_inputs_are_what_the_block_linears_read() -> None:
    full = tiny_model("llama")
    arch = arch_spec(full.config)
    plan = plan_layers(6, 1, 1, 2)
    spec = AdapterSpec.for_plan("lora", plan, arch, 4, 8)
    adapted = attach_adapter(build_emulator(full, plan, arch), arch, spec, plan.emulator_to_full())
    inputs = token_inputs(adapted, 0, batch_size=7)
    vocab = int(full.config.vocab_size)
    q_name = next(name for name in inputs if name.endswith("self_attn.q_proj"))
    assert all(tensor.shape[0] == vocab for tensor in inputs.values())
    # q_proj reads the normalised embedding: RMSNorm(embedding) * weight
    block = full.model.layers[0]
    expected = block.input_layernorm(full.model.embed_tokens.weight[:, None, :]).squeeze(1)
    torch.testing.assert_close(inputs[q_name], expected.detach(), rtol=1e-5, atol=1e-5)
    # every LoRA-wrapped linear of the block has its inputs (keys match effective_updates)
    updates = effective_updates(adapted.trainable_state(), adapted.trainable_state(), spec, 0)
    assert set(updates) <= set(inputs)


def test_label_inference_names_the_label_a_client_trained_on(tokenizer) -> None:
    from leakage import answer_shift

    from emulator.batches import encode_pair
    from offsite.prompts import classification_parts, verbalize

    full = tiny_model("llama")
    arch = arch_spec(full.config)
    plan = plan_layers(6, 1, 1, 2)
    spec = AdapterSpec.for_plan("lora", plan, arch, 4, 8)
    adapted = attach_adapter(build_emulator(full, plan, arch), arch, spec, plan.emulator_to_full())
    template = "Text: {text}\nTopic:"
    candidates = [
        tokenizer(verbalize(lab), add_special_tokens=False)["input_ids"][0] for lab in LABELS
    ]
    assert len(set(candidates)) == len(LABELS)
    prompts = [
        torch.tensor(encode_pair(tokenizer, *classification_parts(t, template, 10), "", 48)[0])
        for t in tiny_texts(LABELS[2], 4, seed=11)  # public prompts need not match the label
    ]

    def logits(state):
        adapted.load_trainable(state)
        with torch.no_grad():
            return torch.stack(
                [adapted.model(input_ids=ids[None]).logits[0, -1] for ids in prompts]
            )

    before = adapted.trainable_state()
    base = logits(before)
    for label in LABELS[:2]:
        adapted.load_trainable(before)
        examples = [Example(t, label=label) for t in tiny_texts(label, 12, seed=3)]
        stream = training_batches(
            tokenizer, examples, template, max_words=10, max_length=48, batch_size=6, seed=0
        )
        torch.manual_seed(0)
        train_adapter(
            adapted, stream, steps=8, lr=2e-2, precision="fp32", device=torch.device("cpu")
        )
        after = adapted.trainable_state()
        rise = answer_shift(base, logits(after), candidates)
        assert LABELS[int(rise.argmax())] == label, (label, rise)
        assert float(answer_shift(base, logits(before), candidates).abs().max()) == 0.0
