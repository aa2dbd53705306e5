"""``offsite eval RUN``: recompute the five-way table of a finished run from its folder."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from coordinator.evaluation.five_way import EvalSpec, four_way, score_model
from coordinator.evaluation.lmeval import lm_eval_accuracy, write_multiple_choice_task
from coordinator.evaluation.report import five_way_table, margin_lines
from coordinator.models import load_full_model
from coordinator.serve.export import export_run
from coordinator.state.adapters import load_adapter
from coordinator.state.folder import RunFolder
from coordinator.state.health import adapter_changed
from emulator.forward import pick_device
from emulator.tokenizers import Tokenizer
from offsite.config import OffsiteConfig
from offsite.data import Example, Task, load_task, split_holdout
from offsite.errors import DataError

log = logging.getLogger(__name__)


def evaluate_run(
    run_dir: Path, round_: int | None = None, lm_eval: bool = False
) -> dict[str, dict[str, str | float]]:
    """Score full zero-shot, emulator zero-shot, emulator fine-tuned and plug-in for a run.

    With ``lm_eval``, also score the full model and the exported plug-in model with
    lm-evaluation-harness on the same held-out multiple-choice data, side by side with Offsite's
    own scorer (fp32, no truncation), under ``table["lm_eval"]``.
    """
    folder = RunFolder.existing(run_dir)
    config = folder.config()
    rounds = config.federation.rounds if round_ is None else round_
    adapter_path = folder.adapter_path(rounds)
    if not adapter_path.is_file():
        available = ", ".join(f"round-{r}" for r in folder.adapter_rounds())
        raise DataError(f"{adapter_path} does not exist; available: {available or 'none'}")
    bundle = folder.bundle()
    state = load_adapter(adapter_path)
    task = load_task(config.data.name, config.data.text_field, config.data.label_field)
    _, held = split_holdout(task.examples, config.data.eval_size, config.seed)
    full_model, tokenizer, _, resolved = load_full_model(config.model.name)
    spec = EvalSpec.from_config(config, task, held, pick_device())
    with tqdm(total=4 * len(held), desc="evaluating", unit="ex", dynamic_ncols=True) as bar:
        scores = four_way(full_model, tokenizer, bundle, state, spec, bar)
    table: dict[str, dict[str, str | float]] = {
        k: {"metric": s.metric, "value": s.value} for k, s in scores.items()
    }
    log.info(
        "round %d of %s\n%s\n%s",
        rounds,
        folder.name,
        five_way_table(table),
        "\n".join(margin_lines(table, {"adapter_changed": adapter_changed(folder, state)})),
    )
    if lm_eval:
        table["lm_eval"] = dict(
            cross_check(folder, rounds, config, task, held, full_model, tokenizer, resolved)
        )
    return table


def cross_check(
    folder: RunFolder,
    round_: int,
    config: OffsiteConfig,
    task: Task,
    held: list[Example],
    full_model: Any,
    tokenizer: Tokenizer,
    base_path: Path | str,
) -> dict[str, float]:
    """Offsite vs lm-eval accuracy for full zero-shot and plug-in on the held-out data."""
    import dataclasses

    from transformers import AutoModelForCausalLM

    if task.kind != "classification":
        raise DataError("the lm-eval cross-check needs a classification (multiple-choice) task")
    merged = folder.export_dir(round_) / "merged"
    if not (merged / "config.json").is_file():
        merged = export_run(folder.path, round_).merged
    task_dir = folder.lm_eval_dir
    template = config.data.template or task.template
    name = write_multiple_choice_task(held, task.labels, template, config.data.max_words, task_dir)
    # lm-eval scores in fp32 without truncation: do the same here, whatever the run used
    spec = dataclasses.replace(
        EvalSpec.from_config(config, task, held, pick_device()),
        precision="fp32",
        max_length=1_000_000,
    )
    # as a plain Module: transformers' PreTrainedModel.eval is unannotated (the call runs it)
    plugged: torch.nn.Module = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    plugged.eval()
    result = {
        "full_zero_shot_offsite": score_model(full_model, tokenizer, spec).value,
        "full_zero_shot_lm_eval": lm_eval_accuracy(base_path, task_dir, name),
        "plug_in_offsite": score_model(plugged, tokenizer, spec).value,
        "plug_in_lm_eval": lm_eval_accuracy(merged, task_dir, name),
    }
    log.info(
        "lm-eval cross-check (task %s in %s):\n"
        "| setting | offsite | lm-eval |\n|---|---|---|\n"
        "| full zero-shot | %.1f %% | %.1f %% |\n| plug-in | %.1f %% | %.1f %% |",
        name,
        task_dir,
        100 * result["full_zero_shot_offsite"],
        100 * result["full_zero_shot_lm_eval"],
        100 * result["plug_in_offsite"],
        100 * result["plug_in_lm_eval"],
    )
    return result
