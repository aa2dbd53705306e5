"""Evaluation primitives: multiple-choice accuracy by log-likelihood, and answer perplexity."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from emulator.batches import Batch, collate, encode_pair, pad_id
from emulator.examples import encode_examples
from emulator.forward import (
    answer_token_logprobs,
    autocast,
    continuation_logprobs,
    keeps_kv_cache,
    prompt_forward,
)
from emulator.tokenizers import Tokenizer
from offsite.data import Example
from offsite.prompts import classification_parts, verbalize


@dataclass(frozen=True)
class Score:
    metric: str  # "accuracy" | "perplexity"
    value: float
    nll: float  # mean negative log-likelihood of the correct answer (per token)
    count: int


def _label_token_ids(tokenizer: Tokenizer, labels: Sequence[str]) -> list[list[int]]:
    ids = [tokenizer(verbalize(label), add_special_tokens=False)["input_ids"] for label in labels]
    empty = [label for label, i in zip(labels, ids, strict=True) if not i]
    if empty:
        raise ValueError(f"labels {empty} tokenize to nothing; give every label some text")
    return [list(i) for i in ids]


def _length_buckets(rows: Sequence[list[int]], batch_size: int) -> list[list[int]]:
    """Row indices in batches of similar length: left padding then costs almost nothing."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _label_scores(
    model: nn.Module, batch: Batch, label_ids: Sequence[list[int]], cached: bool
) -> torch.Tensor:
    """Summed log-likelihood of each label after each prompt: (B, labels).

    One forward over the prompts gives every label's first token; a label's further tokens
    run on a copy of the prompts' KV cache (a few positions), so L labels cost about one
    prompt forward instead of L. Without a KV cache, each label runs prompt + label.
    """
    first, cache = prompt_forward(model, batch, keep_cache=cached)
    columns = []
    multi = [i for i, ids in enumerate(label_ids) if len(ids) > 1]
    for index, ids in enumerate(label_ids):
        score = first[:, ids[0]]
        if len(ids) > 1:
            if cache is not None:
                own = cache if index == multi[-1] else copy.deepcopy(cache)
                score = score + continuation_logprobs(model, batch, own, ids)
            else:
                score = _uncached_label_score(model, batch, ids)
        columns.append(score)
    return torch.stack(columns, dim=-1)


def _uncached_label_score(model: nn.Module, batch: Batch, ids: list[int]) -> torch.Tensor:
    """prompt + label in one forward (models without a KV cache)."""
    width = len(ids)
    rows = batch.input_ids.shape[0]
    label = torch.tensor(ids, device=batch.input_ids.device).expand(rows, -1)
    full = Batch(
        torch.cat([batch.input_ids, label], dim=1),
        torch.cat([batch.attention_mask, torch.ones_like(label)], dim=1),
        torch.cat([torch.full_like(batch.input_ids, -100), label], dim=1),
        width,
    )
    logprobs, _ = answer_token_logprobs(model, full)
    return logprobs.sum(-1)


@torch.no_grad()
def label_log_likelihoods(
    model: nn.Module,
    tokenizer: Tokenizer,
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
) -> torch.Tensor:
    """Summed log-likelihood of every label after every example's prompt: (examples, labels).

    Prompts are tokenized once, batched by length and run once whatever the number of labels
    (see ``_label_scores``): the numbers of scoring every prompt + label whole
    (tests/emulator/test_batches_scoring.py), at a fraction of the cost
    (bench/reports/eval_speed.md).
    """
    model.eval()
    label_ids = _label_token_ids(tokenizer, labels)
    longest = max(len(ids) for ids in label_ids)
    reserve = longest if longest > 1 else 0  # room for the label after a cut prompt
    cached = longest > 1 and keeps_kv_cache(model)
    pad = pad_id(tokenizer)
    rows = [
        encode_pair(
            tokenizer,
            *classification_parts(e.text, template, max_words),
            "",
            max_length - reserve,
        )[0]
        for e in examples
    ]
    out = torch.empty(len(examples), len(labels))
    for bucket in _length_buckets(rows, batch_size):
        batch = collate([(rows[i], 0) for i in bucket], pad).to(device)
        with autocast(precision, device):
            out[bucket] = _label_scores(model, batch, label_ids, cached).float().cpu()
        if progress is not None:
            progress(len(bucket))
    return out


def classify(
    model: nn.Module,
    tokenizer: Tokenizer,
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
    scores = label_log_likelihoods(
        model,
        tokenizer,
        examples,
        labels,
        template=template,
        max_words=max_words,
        max_length=max_length,
        batch_size=batch_size,
        precision=precision,
        device=device,
        progress=progress,
    )
    label_index = {label: i for i, label in enumerate(labels)}
    gold = torch.tensor([label_index[e.label] for e in examples])  # type: ignore[index]  # a classification task labels every example (offsite.data)
    correct = int((scores.argmax(-1) == gold).sum())
    nll = float(-scores.gather(-1, gold[:, None]).sum())
    n = len(examples)
    return Score("accuracy", correct / n, nll / n, n)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer: Tokenizer,
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
