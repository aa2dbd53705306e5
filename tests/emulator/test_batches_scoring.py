"""Tokenized batches, answer-only loss, and multiple-choice scoring."""

from __future__ import annotations

import math

import pytest
import torch

from emulator.batches import collate, encode_pair
from emulator.forward import answer_loss, resolve_precision
from emulator.scoring import classify, perplexity
from offsite.data import Example
from tests.conftest import LABELS, tiny_model, tiny_texts

TEMPLATE = "Text: {text}\nTopic:"


def test_tail_and_answer_survive_truncation(tokenizer) -> None:
    head = "Text: " + " ".join(["market"] * 200)
    ids, answer_len = encode_pair(tokenizer, head, "\nTopic:", " sport", max_length=24)
    assert len(ids) == 24
    tail = tokenizer("\nTopic:", add_special_tokens=False)["input_ids"]
    answer = tokenizer(" sport", add_special_tokens=False)["input_ids"]
    assert ids[-len(answer) :] == answer and answer_len == len(answer)
    assert ids[-len(answer) - len(tail) : -len(answer)] == tail


def test_collate_left_pads_and_masks_only_answers() -> None:
    batch = collate([([5, 6, 7], 1), ([8, 9], 2)], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [0, 8, 9]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    assert batch.labels.tolist() == [[-100, -100, 7], [-100, 8, 9]]
    assert batch.answer_span == 2


def test_answer_loss_equals_reference_cross_entropy(tokenizer) -> None:
    model = tiny_model("llama")
    rows = [encode_pair(tokenizer, "Text: shares", "\nTopic:", " business", 64)]
    batch = collate(rows, pad_id=1)
    logits = model(input_ids=batch.input_ids).logits[0]
    ids = batch.input_ids[0]
    span = rows[0][1]
    reference = torch.nn.functional.cross_entropy(logits[-span - 1 : -1], ids[-span:])
    torch.testing.assert_close(answer_loss(model, batch), reference, rtol=1e-5, atol=1e-6)


def _examples() -> list[Example]:
    return [Example(t, label=lab) for lab in LABELS for t in tiny_texts(lab, 4, seed=9)]


MULTI_LABELS = ("business news", "sport", "tech and science today")  # 1 to several tokens
DECODERS = ["llama", "mistral", "qwen2", "gemma3_text", "gpt2", "opt", "bloom", "gpt_neox"]


def _reference_scores(model, tokenizer, examples, labels, max_length):
    """Each example alone, each label as prompt + label in one forward: (N, labels)."""
    from emulator.forward import answer_token_logprobs
    from offsite.prompts import classification_parts, verbalize

    out = []
    for example in examples:
        head, tail = classification_parts(example.text, TEMPLATE, 20)
        row = []
        for label in labels:
            batch = collate([encode_pair(tokenizer, head, tail, verbalize(label), max_length)], 1)
            with torch.no_grad():
                logprobs, _ = answer_token_logprobs(model, batch)
            row.append(float(logprobs.sum()))
        out.append(row)
    return torch.tensor(out)


@pytest.mark.parametrize("family", DECODERS)
def test_shared_prompt_scoring_makes_the_decisions_of_scoring_each_label_in_full(
    tokenizer, family: str
) -> None:
    """One prompt forward per length bucket + the labels' tail tokens on its KV cache gives
    every label's log-likelihood as prompt + label run whole, one example at a time."""
    model = tiny_model(family)
    examples = [
        Example(" ".join(tiny_texts(topic, 1 + i % 3, seed=i)), label=label)
        for i, (topic, label) in enumerate(list(zip(LABELS, MULTI_LABELS, strict=True)) * 4)
    ]
    reference = _reference_scores(model, tokenizer, examples, MULTI_LABELS, 96)
    gold = torch.tensor([MULTI_LABELS.index(e.label) for e in examples])
    common = dict(
        template=TEMPLATE,
        max_words=20,
        max_length=96,
        batch_size=5,
        precision="fp32",
        device=torch.device("cpu"),
    )
    prompt_forwards = []
    hook = model.register_forward_pre_hook(
        lambda _m, args, kwargs: prompt_forwards.append(kwargs["input_ids"].shape[1]),
        with_kwargs=True,
    )
    score = classify(model, tokenizer, examples, MULTI_LABELS, **common)
    hook.remove()
    assert round(score.value * len(examples)) == int((reference.argmax(-1) == gold).sum())
    assert score.nll == pytest.approx(float(-reference.gather(-1, gold[:, None]).mean()), rel=1e-5)
    longest_tail = max(len(tokenizer(" " + lab)["input_ids"]) for lab in MULTI_LABELS) - 1
    prompts = [width for width in prompt_forwards if width > longest_tail]
    assert len(prompts) == 3, prompt_forwards  # 12 examples in batches of 5: one forward each
    # every label's column, not only the gold one: relabel all examples with each label in turn
    for column, label in enumerate(MULTI_LABELS):
        relabelled = [Example(e.text, label=label) for e in examples]
        each = classify(model, tokenizer, relabelled, MULTI_LABELS, **common)
        assert each.nll == pytest.approx(float(-reference[:, column].mean()), rel=1e-5)


def test_a_model_without_a_kv_cache_scores_each_label_whole_to_the_same_numbers(
    tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import emulator.scoring as scoring

    model = tiny_model("llama")
    examples = [
        Example(" ".join(tiny_texts(topic, 2, seed=i)), label=label)
        for i, (topic, label) in enumerate(zip(LABELS, MULTI_LABELS, strict=True))
    ]
    reference = _reference_scores(model, tokenizer, examples, MULTI_LABELS, 96)
    monkeypatch.setattr(scoring, "keeps_kv_cache", lambda _model: False)
    scores = scoring.label_log_likelihoods(
        model,
        tokenizer,
        examples,
        MULTI_LABELS,
        template=TEMPLATE,
        max_words=20,
        max_length=96,
        batch_size=2,
        precision="fp32",
        device=torch.device("cpu"),
    )
    torch.testing.assert_close(scores, reference, rtol=1e-5, atol=1e-5)


def test_batches_are_bucketed_by_length() -> None:
    from emulator.scoring import _length_buckets

    rows = [[0] * n for n in (9, 2, 7, 3, 8, 1)]
    buckets = _length_buckets(rows, 2)
    assert [[len(rows[i]) for i in b] for b in buckets] == [[1, 2], [3, 7], [8, 9]]


def test_perplexity_matches_exp_of_mean_nll(tokenizer) -> None:
    model = tiny_model("llama")
    examples = [Example("", completion=t) for t in tiny_texts("tech", 3)]
    score = perplexity(
        model,
        tokenizer,
        examples,
        max_words=20,
        max_length=64,
        batch_size=2,
        precision="fp32",
        device=torch.device("cpu"),
    )
    assert score.metric == "perplexity"
    assert score.value == pytest.approx(math.exp(score.nll))
    assert score.value > 1.0


def test_precision_auto_resolves_to_a_concrete_choice() -> None:
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", torch.device("cpu")) in {"fp32", "bf16"}
