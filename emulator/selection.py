"""Training-free choice of which middle blocks the emulator keeps.

``uniform`` is the offsite-tuning reference (``emulator/layers.py``). ``cosine`` keeps the middle
blocks that change the hidden state most: for each block, the mean over tokens of
1 − cos(input, output) on public calibration text; the ``keep`` highest-scoring blocks are kept
in their original order. Blocks that barely change their input are the cheapest to drop.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from emulator.batches import collate, encode_pair, pad_id
from emulator.layers import LayerPlan
from emulator.tokenizers import Tokenizer


@torch.no_grad()
def block_change_scores(
    model: nn.Module,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    max_length: int = 128,
    batch_size: int = 8,
) -> list[float]:
    """Mean 1 − cos(input, output) of every block over the real tokens of ``texts``."""
    rows = [encode_pair(tokenizer, "", "", t, max_length) for t in texts if t.strip()]
    if not rows:
        raise ValueError("block scoring needs at least one non-empty text")
    device = next(model.parameters()).device
    totals: torch.Tensor | None = None
    count = 0
    model.eval()
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start : start + batch_size], pad_id(tokenizer)).to(device)
        out = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            output_hidden_states=True,
            use_cache=False,
        )
        states = out.hidden_states
        mask = batch.attention_mask.bool()
        changes = torch.stack(
            [
                (1 - torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1))[
                    mask
                ].sum()
                for a, b in itertools.pairwise(states)
            ]
        )
        totals = changes if totals is None else totals + changes
        count += int(mask.sum())
    assert totals is not None
    return (totals / count).tolist()


def select_by_change(plan: LayerPlan, scores: Sequence[float], keep: int) -> LayerPlan:
    """The plan with its middle replaced by the ``keep`` most-changing middle blocks."""
    adapter = set(plan.adapter_layers)
    middle = [i for i in range(plan.num_layers) if i not in adapter]
    if not 1 <= keep <= len(middle):
        raise ValueError(f"cannot keep {keep} of {len(middle)} middle blocks")
    chosen = sorted(sorted(middle, key=lambda i: -scores[i])[:keep])
    return LayerPlan(plan.num_layers, plan.bottom, tuple(chosen), plan.top)
