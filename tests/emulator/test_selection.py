"""Cosine layer selection keeps the blocks that change the hidden state most."""

from __future__ import annotations

import torch

from emulator.arch import arch_spec, block_list
from emulator.build import choose_plan
from emulator.layers import plan_layers
from emulator.selection import block_change_scores, select_by_change
from offsite.config import EmulatorConfig
from offsite.data import Example, write_jsonl
from tests.conftest import LABELS, tiny_model, tiny_texts


def _identity_blocks(model: torch.nn.Module, indices: list[int]) -> None:
    """Zero the residual writes of these blocks: they pass their input through unchanged."""
    blocks = block_list(model, arch_spec(model.config))
    with torch.no_grad():
        for i in indices:
            blocks[i].self_attn.o_proj.weight.zero_()
            blocks[i].mlp.down_proj.weight.zero_()


def test_identity_blocks_score_zero_and_are_dropped(tokenizer) -> None:
    model = tiny_model("llama")
    _identity_blocks(model, [2, 3])
    texts = [t for lab in LABELS for t in tiny_texts(lab, 3)]
    scores = block_change_scores(model, tokenizer, texts, max_length=32)
    assert len(scores) == 6
    assert scores[2] < 1e-5 and scores[3] < 1e-5
    assert min(scores[1], scores[4]) > 1e-3
    plan = select_by_change(plan_layers(6, 1, 1, 2), scores, 2)
    assert plan.middle_kept == (1, 4)


def test_choose_plan_uses_the_configured_selection(tmp_path, tokenizer) -> None:
    public = tmp_path / "public.jsonl"
    write_jsonl([Example("", completion=t) for t in tiny_texts("tech", 6)], public)
    model = tiny_model("llama")
    _identity_blocks(model, [1, 2])
    arch = arch_spec(model.config)
    uniform = choose_plan(model, tokenizer, arch, EmulatorConfig(bottom=1, top=1, keep=2))
    assert uniform.middle_kept == (1, 4)  # the reference keeps the ends
    cosine = choose_plan(
        model,
        tokenizer,
        arch,
        EmulatorConfig(bottom=1, top=1, keep=2, selection="cosine", public_text=str(public)),
    )
    assert cosine.middle_kept == (3, 4)  # blocks 1 and 2 do nothing
