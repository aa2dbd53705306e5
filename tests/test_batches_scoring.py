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


def test_tail_and_answer_survive_truncation(tokenizer) -> None:  # type: ignore[no-untyped-def]
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


def test_answer_loss_equals_reference_cross_entropy(tokenizer) -> None:  # type: ignore[no-untyped-def]
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


def test_single_and_multi_token_scoring_paths_agree(tokenizer, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The fast next-token path and the full log-likelihood path pick the same labels."""
    import emulator.scoring as scoring

    model = tiny_model("llama")
    common = dict(
        template=TEMPLATE,
        max_words=20,
        max_length=64,
        batch_size=4,
        precision="fp32",
        device=torch.device("cpu"),
    )
    fast = classify(model, tokenizer, _examples(), LABELS, **common)  # type: ignore[arg-type]
    monkeypatch.setattr(scoring, "_single_token_labels", lambda *_: None)
    slow = classify(model, tokenizer, _examples(), LABELS, **common)  # type: ignore[arg-type]
    single = all(
        len(tokenizer(" " + lab, add_special_tokens=False)["input_ids"]) == 1 for lab in LABELS
    )
    if single:
        assert fast.value == slow.value
        assert fast.nll == pytest.approx(slow.nll, rel=1e-4)
    assert 0.0 <= slow.value <= 1.0 and slow.count == len(_examples())


def test_perplexity_matches_exp_of_mean_nll(tokenizer) -> None:  # type: ignore[no-untyped-def]
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
