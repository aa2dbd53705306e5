"""Cross-check Offsite's scores with EleutherAI's lm-evaluation-harness (lm-eval 0.4).

The held-out examples are written as a local multiple-choice task (JSONL + task YAML, loaded by
the ``json`` dataset builder: no downloads). Prompts are exactly Offsite's (template, words cut),
choices are the label names, lm-eval's ``target_delimiter`` adds the same leading space Offsite's
verbalizer does, and both score a choice by its summed log-likelihood — so the accuracies must
agree when Offsite scores in fp32 without token truncation. Peers can re-run the task file with
plain ``lm_eval --include_path``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from offsite.data import Example
from offsite.errors import OffsiteError
from offsite.prompts import classification_parts


def write_multiple_choice_task(
    examples: Sequence[Example],
    labels: Sequence[str],
    template: str,
    max_words: int,
    out_dir: Path,
    name: str = "offsite_heldout",
) -> str:
    """Write ``<name>.jsonl`` and ``<name>.yaml`` into ``out_dir``; return the task name."""
    out_dir.mkdir(parents=True, exist_ok=True)
    index = {label: i for i, label in enumerate(labels)}
    data = out_dir / f"{name}.jsonl"
    with data.open("w", encoding="utf-8") as handle:
        for example in examples:
            head, tail = classification_parts(example.text, template, max_words)
            row = {
                "prompt": head + tail,
                "choices": list(labels),
                "gold": index[str(example.label)],
            }
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out_dir / f"{name}.yaml").write_text(
        "\n".join(
            [
                f"task: {name}",
                "dataset_path: json",
                "dataset_kwargs:",
                "  data_files:",
                f"    test: {json.dumps(str(data.resolve()))}",
                "test_split: test",
                "output_type: multiple_choice",
                'doc_to_text: "{{prompt}}"',
                'doc_to_choice: "{{choices}}"',
                'doc_to_target: "{{gold}}"',
                'target_delimiter: " "',
                "metric_list:",
                "  - metric: acc",
                "    aggregation: mean",
                "    higher_is_better: true",
                "",
            ]
        )
    )
    return name


def lm_eval_accuracy(
    model_dir: Path | str, task_dir: Path, task: str, batch_size: int = 8
) -> float:
    """lm-eval's ``acc`` for a Hugging Face model folder on a task written above."""
    try:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise OffsiteError(
            "lm-eval is not installed: `pip install 'lm-eval==0.4.13'` (make setup installs it)"
        ) from err
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = simple_evaluate(
        model="hf",
        model_args=f"pretrained={model_dir},dtype=float32",
        tasks=[task],
        task_manager=TaskManager(include_path=str(task_dir)),
        batch_size=batch_size,
        device="cpu",
    )
    return float(results["results"][task]["acc,none"])
