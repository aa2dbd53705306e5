"""Which part of the adapter transfers? Plug-in with only the bottom or only the top blocks' update.

Run: .venv/bin/python bench/adapter_parts.py RUN_DIR [RUN_DIR ...]

For a finished `offsite simulate` run, the final adapter is plugged into the full model three
ways and scored on the run's own held-out examples: whole (the run's plug-in), bottom blocks'
tensors only (the top blocks left as pretrained), top blocks' only. The emulator fine-tuned
score is repeated the same ways. A diagnostic, one run at a time: if the top blocks alone
transfer and the bottom ones do not, the emulator's middle responds to the bottom adapter's
change differently from the full middle (its Jacobian), not at its output. Results are
appended to bench/reports/adapter_parts.json.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "reports" / "adapter_parts.json"


def _block_of(name: str) -> int | None:
    found = re.search(r"\.(\d+)\.", name)
    return int(found.group(1)) if found else None


def measure(run_dir: Path) -> dict[str, Any]:
    from coordinator.evaluation.five_way import EvalSpec, evaluate_emulator, evaluate_plug_in
    from coordinator.models import load_full_model
    from coordinator.state.adapters import load_adapter
    from coordinator.state.folder import RunFolder
    from emulator.bundle import verify_bundle
    from emulator.forward import pick_device
    from offsite.data import load_task, split_holdout

    folder = RunFolder.existing(run_dir)
    config = folder.config()
    task = load_task(config.data.name, config.data.text_field, config.data.label_field)
    _, held = split_holdout(task.examples, config.data.eval_size, config.seed)
    full_model, tokenizer, _, _ = load_full_model(config.model.name)
    bundle = verify_bundle(folder.bundle_dir)
    state = load_adapter(folder.adapter_path(config.federation.rounds))
    spec = EvalSpec.from_config(config, task, held, pick_device())
    plan = bundle.plan
    bottom, top = set(plan.bottom), set(plan.top)
    pretrained = load_adapter(folder.adapter_path(0))
    parts = {
        "whole": state,
        "bottom only": {k: state[k] if _block_of(k) in bottom else pretrained[k] for k in state},
        "top only": {k: state[k] if _block_of(k) in top else pretrained[k] for k in state},
    }
    out: dict[str, Any] = {"run": str(run_dir), "plan": plan.label, "eval_size": len(held)}
    for part, tensors in parts.items():
        plug = evaluate_plug_in(full_model, tokenizer, bundle.adapter, tensors, spec)
        emu = evaluate_emulator(bundle, tokenizer, tensors, spec)
        out[part] = {"plug_in": 100 * plug.value, "emulator_fine_tuned": 100 * emu.value}
        print(run_dir.parent.name, part, out[part], flush=True)
    return out


def main() -> None:
    results = json.loads(OUT.read_text()) if OUT.is_file() else {}
    for arg in sys.argv[1:]:
        run_dir = Path(arg).resolve()
        results[str(run_dir.relative_to(ROOT))] = measure(run_dir)
        OUT.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
