"""Tokenize (prompt, answer) pairs into left-padded batches with a loss mask.

Decisions:
- Left padding puts every answer at the end of its row, so the model only needs logits for the
  last ``max(answer) + 1`` positions (``logits_to_keep``): the LM head over a 49k vocabulary is
  a large share of the compute, and we skip it for prompt positions.
- A prompt is (head, tail): when too long, the head is cut from its end and the tail
  (e.g. ``"\nCategory:"``) is always kept, so the answer position is never truncated away.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from emulator.tokenizers import Tokenizer


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) left-padded
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T) -100 except answer tokens
    answer_span: int  # max answer length in tokens

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.labels.to(device),
            self.answer_span,
        )


def _ids(tokenizer: Tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _prefix_ids(tokenizer: Tokenizer) -> list[int]:
    """The BOS the tokenizer adds by itself (Llama-2 style), or nothing (SmolLM2, GPT-2)."""
    ids = list(tokenizer("")["input_ids"])
    return ids if len(ids) == 1 else []


def encode_pair(
    tokenizer: Tokenizer, head: str, tail: str, answer: str, max_length: int
) -> tuple[list[int], int]:
    """Token ids of head+tail+answer within ``max_length``; returns (ids, answer_length)."""
    answer_ids = _ids(tokenizer, answer) if answer else []
    tail_ids = _ids(tokenizer, tail) if tail else []
    head_ids = _ids(tokenizer, head) if head else []
    bos = _prefix_ids(tokenizer)
    budget = max_length - len(bos) - len(tail_ids) - len(answer_ids)
    if budget < 0:
        answer_ids = answer_ids[: max(1, max_length - len(bos) - len(tail_ids))]
        budget = max(0, max_length - len(bos) - len(tail_ids) - len(answer_ids))
    ids = bos + head_ids[:budget] + tail_ids + answer_ids
    # With no prompt (plain text), the first token has no context to be predicted from.
    return ids, min(len(answer_ids), len(ids) - 1)


def collate(rows: Sequence[tuple[list[int], int]], pad_id: int) -> Batch:
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for r, (ids, answer_len) in enumerate(rows):
        input_ids[r, width - len(ids) :] = torch.tensor(ids)
        attention[r, width - len(ids) :] = 1
        if answer_len:
            labels[r, width - answer_len :] = torch.tensor(ids[len(ids) - answer_len :])
    span = max(a for _, a in rows)
    return Batch(input_ids, attention, labels, span)


def pad_id(tokenizer: Tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def text_batches(
    tokenizer: Tokenizer, texts: Sequence[str], max_length: int, batch_size: int
) -> list[Batch]:
    """Plain texts as language-modelling batches (every token is a target)."""
    rows = [encode_pair(tokenizer, "", "", t, max_length) for t in texts if t.strip()]
    rows = [r for r in rows if r[1] > 0]
    pad = pad_id(tokenizer)
    return [collate(rows[i : i + batch_size], pad) for i in range(0, len(rows), batch_size)]
