"""Run reports: the five-way table, margins, privacy and distillation lines, plots."""

from __future__ import annotations

from pathlib import Path

from coordinator.report import five_way_table, margin_lines, write_report


def _metrics() -> dict:  # type: ignore[type-arg]
    scores = {
        k: {"metric": "accuracy", "value": v, "nll": 0.0, "count": 10}
        for k, v in {
            "full_zero_shot": 0.5,
            "emulator_zero_shot": 0.25,
            "emulator_fine_tuned": 0.6,
            "plug_in": 0.75,
        }.items()
    }
    run = {
        "model": "m",
        "data": "d",
        "eval_examples": 10,
        "plan": "2-8-2",
        "adapter": "lora",
        "num_clients": 2,
        "rounds": 1,
        "full_params": 1e6,
        "bundle_bytes": 1e6,
        "adapter_bytes": 1e3,
        "middle_kept": 8,
        "middle_total": 26,
        "middle_dropped": 18,
        "command": "offsite simulate",
        "privacy": {
            "middle_tensors": 234,
            "middle_tensors_verbatim": 0,
            "middle_verbatim_fraction": 0.0,
        },
        "compression": {
            "distilled": {
                "steps": 200,
                "corpus": "chitchat",
                "texts": 2000,
                "evaluations": [[0, 38369.7], [200, 110.0]],
                "best_perplexity": 110.0,
                "best_step": 200,
            }
        },
    }
    rounds = [{"round": 1, "partition-id": 0, "train-loss": 1.0, "node-id": 1}]
    return {"scores": scores, "run": run, "rounds": rounds, "timings": {"x": 1.0}}


def test_table_and_margins() -> None:
    scores = _metrics()["scores"]
    table = five_way_table(scores)
    assert "| plug-in             |   75.0 % |" in table
    assert margin_lines(scores) == [
        "plug-in − emulator fine-tuned (privacy margin): +15.0 points",
        "plug-in − full zero-shot (gain from tuning): +25.0 points",
    ]


def test_report_files(tmp_path: Path) -> None:
    report = write_report(tmp_path, _metrics()).read_text()
    assert "0 of 234" in report
    assert "emulator distilled 200 steps on chitchat" in report and "38369.7 → 110.0" in report
    for name in ("metrics.json", "five_way.png", "loss_per_round.png"):
        assert (tmp_path / name).stat().st_size > 0
