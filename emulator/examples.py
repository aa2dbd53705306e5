"""Turn task examples into token batches (classification prompts or prompt/completion)."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

from emulator.batches import Batch, collate, encode_pair, pad_id
from emulator.tokenizers import Tokenizer
from offsite.data import Example
from offsite.prompts import classification_parts, cut_words, verbalize


def example_parts(example: Example, template: str, max_words: int) -> tuple[str, str, str]:
    """(head, tail, answer) for training on ``example``."""
    if example.label is not None:
        head, tail = classification_parts(example.text, template, max_words)
        return head, tail, verbalize(example.label)
    return cut_words(example.text, max_words) if example.text else "", "", example.completion or ""


def encode_examples(
    tokenizer: Tokenizer,
    examples: Sequence[Example],
    template: str,
    max_words: int,
    max_length: int,
) -> list[tuple[list[int], int]]:
    rows = []
    for example in examples:
        head, tail, answer = example_parts(example, template, max_words)
        rows.append(encode_pair(tokenizer, head, tail, answer, max_length))
    return rows


def batch_stream(
    rows: Sequence[tuple[list[int], int]], batch_size: int, pad: int, seed: int
) -> Iterator[Batch]:
    """Endless shuffled batches (a new permutation each epoch)."""
    if not rows:
        raise ValueError("no training rows")
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            fresh = list(range(len(rows)))
            rng.shuffle(fresh)
            order.extend(fresh)
        chunk, order = order[:batch_size], order[batch_size:]
        yield collate([rows[i] for i in chunk], pad)


def training_batches(
    tokenizer: Tokenizer,
    examples: Sequence[Example],
    template: str,
    *,
    max_words: int,
    max_length: int,
    batch_size: int,
    seed: int,
) -> Iterator[Batch]:
    rows = encode_examples(tokenizer, examples, template, max_words, max_length)
    return batch_stream(rows, batch_size, pad_id(tokenizer), seed)
