"""``offsite export RUN``: turn a run's aggregated adapter into artifacts serving stacks load.

Writes into ``<run>/export/round-<r>/`` (or ``--out``):

- ``merged/``  the full model with the adapter folded in, ``save_pretrained`` layout
  (safetensors); ``AutoModelForCausalLM.from_pretrained`` loads it with nothing from Offsite.
- ``peft/``    for LoRA runs, a standard PEFT adapter for the *original full model*, restricted
  to the adapter blocks (``layers_to_transform``): ``PeftModel.from_pretrained(full, dir)``,
  vLLM ``--lora-modules`` and TGI load it directly. A merge-exact run's adapter moved the
  blocks' base weights, which no LoRA of the run's rank holds: its whole change per module is
  refactorized by SVD at the numerical rank R of the largest (≤ the sum of the ranks the
  clients trained over all rounds; exact to float rounding), written as a rank-R LoRA with
  scale 1, and ``peft/refactorized.json`` states R and the largest relative error.
- ``README.md`` a model card: the run's five-way table, a data summary (label names and counts,
  never examples) and the command that reproduces the run.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, cast

from coordinator.evaluation.report import five_way_table, margin_lines
from coordinator.models import load_full_model
from coordinator.state.adapters import load_adapter
from coordinator.state.folder import RunFolder
from emulator.adapter import merged_model
from emulator.bundle import bundle_arch
from emulator.lora_merge import as_lora_adapter, split_bases
from emulator.peft_format import write_peft_adapter
from emulator.plug import plug_adapter
from offsite.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    merged: Path
    peft: Path | None
    card: Path


def _final_round(folder: RunFolder) -> int:
    rounds = folder.adapter_rounds()
    if not rounds or rounds[-1] == 0:
        raise DataError(f"{folder.path} has no trained adapter yet (no round 1 or later)")
    return rounds[-1]


def export_run(
    run_dir: Path, round_: int | None = None, out_dir: Path | None = None
) -> ExportResult:
    """Export the round-``round_`` (default: last) adapter of ``run_dir``."""
    folder = RunFolder.existing(run_dir, hint="pass the folder `offsite simulate` printed")
    config = folder.config()
    round_ = _final_round(folder) if round_ is None else round_
    adapter_path = folder.adapter_path(round_)
    if not adapter_path.is_file():
        raise DataError(f"{adapter_path} does not exist; pass --round with an existing round")
    bundle = folder.bundle()
    spec = bundle.adapter
    state = load_adapter(adapter_path)
    out_dir = Path(out_dir) if out_dir else folder.export_dir(round_)
    out_dir.mkdir(parents=True, exist_ok=True)

    source = config.model.name
    full_model, tokenizer, _, resolved = load_full_model(source)
    peft_dir: Path | None = None
    refactorized: dict[str, float] | None = None
    arch = bundle_arch(bundle)
    if spec.policy.lora and split_bases(state)[0]:
        # merge-exact: the adapter blocks' base weights moved; as a LoRA on the original model
        # the whole change is refactorized by SVD at the rank that holds it
        lora, rank, error = as_lora_adapter(
            state, full_model.state_dict(), spec.lora_alpha, arch.lora_fan_in_fan_out
        )
        peft_spec = replace(spec, lora_r=rank, lora_alpha=rank)
        peft_dir = write_peft_adapter(lora, peft_spec, arch, str(resolved), out_dir / "peft")
        refactorized = {"rank": rank, "max_relative_error": error}
        (peft_dir / "refactorized.json").write_text(json.dumps(refactorized, indent=2) + "\n")
        tokenizer.save_pretrained(peft_dir)
    elif spec.policy.lora:
        peft_dir = write_peft_adapter(state, spec, arch, str(resolved), out_dir / "peft")
        tokenizer.save_pretrained(peft_dir)
    plugged = plug_adapter(full_model, spec, state)  # the model is not used again here
    # load_full_model loads a transformers PreTrainedModel and merging keeps its class
    merged = cast("PreTrainedModel", merged_model(plugged))
    merged_dir = out_dir / "merged"
    merged.save_pretrained(merged_dir)
    tokenizer.save_pretrained(merged_dir)
    card = out_dir / "README.md"
    text = model_card(folder, round_, source, spec.kind, peft_dir is not None)
    if refactorized is not None:
        text += (
            "\nMerge-exact aggregation changed the adapter blocks' weights: `merged/` holds them "
            f"exactly; `peft/` is that change refactorized by SVD as a rank-{refactorized['rank']} "
            f"LoRA (largest relative error of a module {refactorized['max_relative_error']:.1e}, "
            "`peft/refactorized.json`).\n"
        )
    card.write_text(text)
    log.info("exported round %d of %s to %s", round_, folder.name, out_dir)
    return ExportResult(out_dir, merged_dir, peft_dir, card)


def model_card(folder: RunFolder, round_: int, source: str, kind: str, has_peft: bool) -> str:
    metrics = folder.metrics()
    lines = [
        "---",
        "library_name: transformers",
        "tags: [offsite-tuning, federated-learning, lora]"
        if has_peft
        else "tags: [offsite-tuning]",
        "---",
        "",
        f"# {Path(source).name} + federated adapter (Offsite run `{folder.name}`, round {round_})",
        "",
        f"The base model **{source}** with a {kind} adapter trained by offsite-tuning: data owners "
        "fine-tuned the adapter against a compressed emulator on data that never left them; the "
        "model owner aggregated the adapters with FedAvg and plugged them in.",
        "",
    ]
    run = metrics.get("run", {})
    if metrics.get("scores"):
        evaluated = metrics["config"]["federation"]["rounds"]
        lines += [
            f"## Evaluation (held-out, round {evaluated})",
            "",
            five_way_table(metrics["scores"]),
            "",
            *[f"- {line}" for line in margin_lines(metrics["scores"], metrics.get("training"))],
            "",
        ]
    if run:
        labels = ", ".join(run.get("labels", [])) or "—"
        lines += [
            "## Training data (summary only)",
            "",
            f"- task: {run.get('data')} ({run.get('task_kind')}); labels: {labels}",
            f"- {run.get('num_clients')} data owners, {run.get('rounds')} rounds; "
            f"emulator {run.get('plan')} ({run.get('middle_dropped')} middle blocks never shipped)",
            f"- held-out evaluation examples: {run.get('eval_examples')}",
            "",
            f"Reproduce: `{run.get('command', 'offsite simulate')}`",
            "",
        ]
    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM", ""]
    lines += ['model = AutoModelForCausalLM.from_pretrained("merged")']
    if has_peft:
        lines += [
            "",
            "# or, as an adapter on the original model:",
            "from peft import PeftModel",
            f'base = AutoModelForCausalLM.from_pretrained("{source}")',
            'model = PeftModel.from_pretrained(base, "peft")',
        ]
    lines += ["```", ""]
    return "\n".join(lines)
