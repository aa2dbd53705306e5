"""The full fine-tuning baseline is cached by what determines it, and only by that."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coordinator.evaluation.baseline_cache import (
    baseline_key,
    cached_baseline,
    store_baseline,
    weights_digest,
)
from emulator.adapter import AdapterSpec
from emulator.scoring import Score
from offsite.config import load_config
from offsite.data import Example, write_jsonl
from tests.conftest import LABELS, tiny_model, tiny_texts

TRAIN = [Example(t, label=lab) for lab in LABELS for t in tiny_texts(lab, 4)]
HELD = [Example(t, label=lab) for lab in LABELS for t in tiny_texts(lab, 2, seed=5)]
ADAPTER = AdapterSpec("lora", (0, 5))


def _key(overrides: list[str], **changes: object) -> str:
    parts = {
        "model_digest": weights_digest(tiny_model("llama")),
        "adapter": ADAPTER,
        "train": TRAIN,
        "held": HELD,
        "template": "Text: {text}\nTopic:",
        "config": load_config(None, overrides),
    }
    parts.update(changes)
    return baseline_key(**parts)


def test_the_zero_shot_key_follows_weights_held_out_data_and_scoring_only() -> None:
    from coordinator.evaluation.baseline_cache import zero_shot_key

    weights = weights_digest(tiny_model("llama"))
    template = "Text: {text}\nTopic:"
    base = zero_shot_key(weights, HELD, template, load_config(None, []))
    for same in (["train.lr=0.01", "emulator.keep=4", "federation.rounds=5", "seed=3"],):
        assert zero_shot_key(weights, HELD, template, load_config(None, same)) == base
    assert zero_shot_key(weights, HELD[:-1], template, load_config(None, [])) != base
    assert zero_shot_key(weights, HELD, "Q: {text}\nA:", load_config(None, [])) != base
    assert zero_shot_key(weights, HELD, template, load_config(None, ["data.max_words=20"])) != base


def test_the_key_follows_model_data_and_recipe_but_not_the_emulator() -> None:
    base = _key([])
    assert _key([]) == base
    assert _key(["emulator.keep=4", "emulator.quantize='int4'", "emulator.distill=true"]) == base
    changed = {
        "weights": _key([], model_digest=weights_digest(tiny_model("llama", seed=1))),
        "lr": _key(["train.lr=0.01"]),
        "local steps": _key(["train.local_steps=3"]),
        "rounds": _key(["federation.rounds=5"]),
        "seed": _key(["seed=3"]),
        "training data": _key([], train=TRAIN[:-1]),
        "held-out data": _key([], held=HELD[:-1]),
        "template": _key([], template="Q: {text}\nA:"),
        "adapter": _key([], adapter=AdapterSpec("lora", (0, 5), lora_r=4)),
        "eval precision": _key(["eval.precision='bf16'"]),
    }
    assert all(key != base for key in changed.values()), [
        n for n, k in changed.items() if k == base
    ]
    assert len(set(changed.values())) == len(changed)


def test_an_entry_round_trips_and_a_damaged_one_is_recomputed(tmp_path: Path) -> None:
    folder = tmp_path / "baselines"
    score = Score("accuracy", 0.75, 0.41, 12)
    path = store_baseline("k" * 64, score, 12.5, folder)
    assert cached_baseline("k" * 64, folder) == (score, 12.5)
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    assert [p.name for p in folder.iterdir()] == [path.name]  # no temporary left behind
    path.write_text('{"metric": "accuracy", "value": ')
    assert cached_baseline("k" * 64, folder) is None
    assert cached_baseline("f" * 64, folder) is None


@pytest.mark.integration
def test_a_second_run_with_another_emulator_reads_the_baseline_instead_of_training(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import coordinator.workflow.simulate as simulate_module

    monkeypatch.setenv("OFFSITE_BASELINES", str(tmp_path / "baselines"))
    data = tmp_path / "task.jsonl"
    write_jsonl([Example(t, label=lab) for lab in LABELS for t in tiny_texts(lab, 20)], data)
    trained = []
    real = simulate_module.full_fine_tune
    monkeypatch.setattr(
        simulate_module, "full_fine_tune", lambda *a, **k: trained.append(1) or real(*a, **k)
    )

    def run(keep: int, *extra: str) -> dict:
        config = load_config(
            None,
            [
                f"model.name='{tiny_llama_dir}'",
                f"data.name='{data}'",
                "data.eval_size=9",
                "data.max_length=48",
                "emulator.bottom=1",
                "emulator.top=1",
                f"emulator.keep={keep}",
                "federation.num_clients=2",
                "federation.rounds=1",
                "train.local_steps=2",
                "train.batch_size=4",
                "train.precision='fp32'",
                f"output_dir='{tmp_path / 'runs'}'",
                *extra,
            ],
        )
        result = simulate_module.simulate(config)
        metrics = json.loads((result.run_dir / "metrics.json").read_text())
        metrics["report"] = (result.run_dir / "report.md").read_text()
        return metrics

    first = run(2)
    assert len(trained) == 1 and "computed in" in first["notes"]["full fine-tuning baseline"]
    second = run(1)
    assert len(trained) == 1, "the second run trained the full model again"
    assert second["scores"]["full_fine_tuned"] == first["scores"]["full_fine_tuned"]
    assert "cached" in second["notes"]["full fine-tuning baseline"]
    assert "full fine-tuning baseline: cached" in second["report"]
    # full zero-shot does not depend on the emulator either
    assert second["scores"]["full_zero_shot"] == first["scores"]["full_zero_shot"]
    assert second["notes"]["full zero-shot"] == "cached" and "full zero-shot" not in first["notes"]
