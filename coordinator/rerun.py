"""``offsite eval RUN``: recompute the five-way table of a finished run from its folder."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import tomllib
import torch
from tqdm.auto import tqdm

from coordinator.adapters import load_adapter
from coordinator.evaluate import EvalSpec, four_way, score_model
from coordinator.export import export_run
from coordinator.lmeval import lm_eval_accuracy, write_multiple_choice_task
from coordinator.models import load_full_model
from coordinator.report import five_way_table, margin_lines
from coordinator.run_health import adapter_changed
from emulator.bundle import verify_bundle
from emulator.forward import pick_device
from offsite.config import OffsiteConfig, config_from_dict
from offsite.data import Example, Task, load_task, split_holdout
from offsite.errors import DataError

log = logging.getLogger(__name__)


def evaluate_run(
    run_dir: Path, round_: int | None = None, lm_eval: bool = False
) -> dict[str, dict[str, float]]:
    """Score full zero-shot, emulator zero-shot, emulator fine-tuned and plug-in for a run.

    With ``lm_eval``, also score the full model and the exported plug-in model with
    lm-evaluation-harness on the same held-out multiple-choice data, side by side with Offsite's
    own scorer (fp32, no truncation), under ``table["lm_eval"]``.
    """
    config_path = run_dir / "config.toml"
    if not config_path.is_file():
        raise DataError(
            f"{run_dir} is not a run folder (no config.toml); pass a folder under runs/"
        )
    config = config_from_dict(tomllib.loads(config_path.read_text()))
    rounds = config.federation.rounds if round_ is None else round_
    adapter_path = run_dir / "adapters" / f"round-{rounds}.safetensors"
    if not adapter_path.is_file():
        available = sorted(p.stem for p in (run_dir / "adapters").glob("round-*.safetensors"))
        raise DataError(
            f"{adapter_path} does not exist; available: {', '.join(available) or 'none'}"
        )
    bundle = verify_bundle(run_dir / "bundle")
    state = load_adapter(adapter_path)
    task = load_task(config.data.name, config.data.text_field, config.data.label_field)
    _, held = split_holdout(task.examples, config.data.eval_size, config.seed)
    full_model, tokenizer, _, resolved = load_full_model(config.model.name)
    spec = EvalSpec.from_config(config, task, held, pick_device())
    with tqdm(total=4 * len(held), desc="evaluating", unit="ex", dynamic_ncols=True) as bar:
        scores = four_way(full_model, tokenizer, bundle, state, spec, bar)
    table = {k: {"metric": s.metric, "value": s.value} for k, s in scores.items()}
    log.info(
        "round %d of %s\n%s\n%s",
        rounds,
        run_dir.name,
        five_way_table(table),
        "\n".join(margin_lines(table, {"adapter_changed": adapter_changed(run_dir, state)})),
    )
    if lm_eval:
        table["lm_eval"] = cross_check(
            run_dir, rounds, config, task, held, full_model, tokenizer, resolved
        )
    return table


def cross_check(
    run_dir: Path,
    round_: int,
    config: OffsiteConfig,
    task: Task,
    held: list[Example],
    full_model: Any,
    tokenizer: Any,
    base_path: Path | str,
) -> dict[str, float]:
    """Offsite vs lm-eval accuracy for full zero-shot and plug-in on the held-out data."""
    import dataclasses

    from transformers import AutoModelForCausalLM

    if task.kind != "classification":
        raise DataError("the lm-eval cross-check needs a classification (multiple-choice) task")
    merged = run_dir / "export" / f"round-{round_}" / "merged"
    if not (merged / "config.json").is_file():
        merged = export_run(run_dir, round_).merged
    task_dir = run_dir / "lm-eval"
    template = config.data.template or task.template
    name = write_multiple_choice_task(held, task.labels, template, config.data.max_words, task_dir)
    # lm-eval scores in fp32 without truncation: do the same here, whatever the run used
    spec = dataclasses.replace(
        EvalSpec.from_config(config, task, held, pick_device()),
        precision="fp32",
        max_length=1_000_000,
    )
    plugged = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
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
