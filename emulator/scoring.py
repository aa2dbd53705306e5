"""Evaluation primitives: multiple-choice accuracy by log-likelihood, and answer perplexity."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from emulator.batches import collate, encode_pair, pad_id
from emulator.examples import encode_examples
from emulator.forward import answer_logits, answer_token_logprobs, autocast
from offsite.data import Example
from offsite.prompts import classification_parts, verbalize


@dataclass(frozen=True)
class Score:
    metric: str  # "accuracy" | "perplexity"
    value: float
    nll: float  # mean negative log-likelihood of the correct answer (per token)
    count: int


def _single_token_labels(tokenizer: Any, labels: Sequence[str]) -> list[int] | None:
    ids = [tokenizer(verbalize(label), add_special_tokens=False)["input_ids"] for label in labels]
    if all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == len(ids):
        return [i[0] for i in ids]
    return None


@torch.no_grad()
def classify(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    labels: Sequence[str],
    *,
    template: str,
    max_words: int,
    max_length: int,
    batch_size: int,
    precision: str,
    device: torch.device,
    progress: Callable[[int], None] | None = None,
) -> Score:
    """Accuracy of picking the label with the highest log-likelihood (lm-eval multiple choice)."""
    model.eval()
    label_index = {label: i for i, label in enumerate(labels)}
    single = _single_token_labels(tokenizer, labels)
    pad = pad_id(tokenizer)
    correct, nll_total = 0, 0.0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        parts = [classification_parts(e.text, template, max_words) for e in chunk]
        if single is not None:
            rows = [encode_pair(tokenizer, h, t, "", max_length) for h, t in parts]
            batch = collate(rows, pad).to(device)
            with autocast(precision, device):
                logits = answer_logits(model, batch, 1)[:, -1, :].float()
            scores = torch.log_softmax(logits, dim=-1)[:, single]
        else:
            columns = []
            for label in labels:
                rows = [
                    encode_pair(tokenizer, h, t, verbalize(label), max_length) for h, t in parts
                ]
                batch = collate(rows, pad).to(device)
                with autocast(precision, device):
                    logprobs, _ = answer_token_logprobs(model, batch)
                columns.append(logprobs.sum(-1))
            scores = torch.stack(columns, dim=-1)
        gold = torch.tensor([label_index[e.label] for e in chunk], device=scores.device)  # type: ignore[index]
        correct += int((scores.argmax(-1) == gold).sum())
        nll_total += float(-scores.gather(-1, gold[:, None]).sum())
        if progress is not None:
            progress(len(chunk))
    n = len(examples)
    return Score("accuracy", correct / n, nll_total / n, n)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    max_words: int,
    max_length: int,
    batch_size: int,
    precision: str,
    device: torch.device,
    progress: Callable[[int], None] | None = None,
) -> Score:
    """Perplexity of the answers (completions, or whole texts) given their prompts."""
    model.eval()
    rows = encode_examples(tokenizer, examples, "{text}", max_words, max_length)
    pad = pad_id(tokenizer)
    total, tokens = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start : start + batch_size], pad).to(device)
        with autocast(precision, device):
            logprobs, mask = answer_token_logprobs(model, batch)
        total += float(-logprobs.sum())
        tokens += int(mask.sum())
        if progress is not None:
            progress(min(batch_size, len(rows) - start))
    nll = total / max(tokens, 1)
    return Score("perplexity", math.exp(nll), nll, len(rows))
