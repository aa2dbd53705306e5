"""Offsite's multiple-choice scores agree with lm-evaluation-harness on the same data."""

from __future__ import annotations

from pathlib import Path

import pytest

from offsite.data import Example, write_jsonl
from tests.conftest import LABELS, tiny_texts
from tests.coordinator.test_export import _fake_run

pytestmark = pytest.mark.integration


def test_offsite_and_lm_eval_agree(tmp_path: Path, tiny_llama_dir: Path, tokenizer) -> None:
    from coordinator.workflow.rerun import evaluate_run

    data = tmp_path / "task.jsonl"
    write_jsonl([Example(t, label=lab) for lab in LABELS for t in tiny_texts(lab, 12)], data)
    run = _fake_run(
        tmp_path,
        tiny_llama_dir,
        tokenizer,
        "lora",
        [f"data.name='{data}'", "data.eval_size=18", "federation.rounds=2"],
    )
    table = evaluate_run(run, 2, lm_eval=True)
    cross = table["lm_eval"]
    assert cross["full_zero_shot_offsite"] == pytest.approx(cross["full_zero_shot_lm_eval"])
    assert cross["plug_in_offsite"] == pytest.approx(cross["plug_in_lm_eval"])
    assert (run / "lm-eval" / "offsite_heldout.yaml").is_file()
    assert len((run / "lm-eval" / "offsite_heldout.jsonl").read_text().splitlines()) == 18
