"""``offsite eval RUN``: recompute the five-way table of a finished run from its folder."""

from __future__ import annotations

import logging
from pathlib import Path

import tomllib
from tqdm.auto import tqdm

from coordinator.adapters import load_adapter
from coordinator.evaluate import EvalSpec, four_way
from coordinator.models import load_full_model
from coordinator.report import five_way_table, margin_lines
from emulator.bundle import verify_bundle
from emulator.forward import pick_device
from offsite.config import load_config
from offsite.data import load_task, split_holdout
from offsite.errors import DataError

log = logging.getLogger(__name__)


def evaluate_run(run_dir: Path, round_: int | None = None) -> dict[str, dict[str, float]]:
    """Score full zero-shot, emulator zero-shot, emulator fine-tuned and plug-in for a run."""
    config_path = run_dir / "config.toml"
    if not config_path.is_file():
        raise DataError(
            f"{run_dir} is not a run folder (no config.toml); pass a folder under runs/"
        )
    raw = tomllib.loads(config_path.read_text())
    config = load_config(_write_tmp(raw), [])
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
    full_model, tokenizer, _, _ = load_full_model(config.model.name)
    spec = EvalSpec.from_config(config, task, held, pick_device())
    with tqdm(total=4 * len(held), desc="evaluating", unit="ex", dynamic_ncols=True) as bar:
        scores = four_way(full_model, tokenizer, bundle, state, spec, bar)
    table = {k: {"metric": s.metric, "value": s.value} for k, s in scores.items()}
    log.info(
        "round %d of %s\n%s\n%s",
        rounds,
        run_dir.name,
        five_way_table(table),
        "\n".join(margin_lines(table)),
    )
    return table


def _write_tmp(raw: dict) -> Path:  # type: ignore[type-arg]
    import tempfile

    import tomli_w

    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as handle:
        handle.write(tomli_w.dumps(raw))
    return Path(handle.name)
