"""bench/recipe_tuning.py and its tuning tasks: what each run is, and how recipes are ranked
(no model is run here)."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import recipe_tuning
import tuning_tasks

from offsite.config import learning_rate, load_config
from offsite.data import load_task


def test_each_candidate_is_the_default_emulator_with_one_recipe_change(tmp_path: Path) -> None:
    path = tuning_tasks.write_task("chitchat-prompts", tmp_path)
    default = load_config(None, recipe_tuning.overrides_for("default", "chitchat-prompts", 0, path))
    assert default.emulator == load_config(None, []).emulator  # the shipped default emulator
    shipped = load_config(None, []).train  # "default" spells out today's recipe
    assert learning_rate(default.train) == learning_rate(shipped)
    assert dataclasses.replace(default.train, lr=shipped.lr) == shipped
    assert default.federation == load_config(None, []).federation
    assert default.data.template == "Chat: {text}\nTopic:"
    assert load_task(default.data.name).labels == tuple(
        sorted(tuning_tasks.CHITCHAT_PROMPTS.values())
    )
    for recipe in recipe_tuning.RECIPES:
        config = load_config(None, recipe_tuning.overrides_for(recipe, "stdlib-docs", 2, path))
        assert config.seed == 2 and config.data.eval_size == recipe_tuning.EVAL_SIZE
        assert config.emulator == default.emulator
        changed = {
            k
            for section in ("train", "federation")
            for k, v in vars(getattr(config, section)).items()
            if v != vars(getattr(default, section))[k]
        }
        assert len(changed) <= 2 and (recipe == "default") == (not changed)


def test_the_tuning_tasks_are_balanced_fixed_and_do_not_spell_out_their_labels(
    tmp_path: Path,
) -> None:
    first = tuning_tasks.write_task("chitchat-prompts", tmp_path / "a").read_text()
    assert first == tuning_tasks.write_task("chitchat-prompts", tmp_path / "b").read_text()
    rows = [json.loads(line) for line in first.splitlines()]
    assert {r["label"] for r in rows} == set(tuning_tasks.CHITCHAT_PROMPTS.values())
    assert len(rows) == 8 * tuning_tasks.PER_LABEL
    packages = ("email", "logging", "http")  # in every CPython (tkinter and turtle need Tk)
    docs = tuning_tasks.stdlib_docs(packages)
    assert {r["label"] for r in docs} == set(packages)
    assert all(sum(r["label"] == p for r in docs) <= tuning_tasks.PER_LABEL for p in packages)
    for row in docs:
        assert not re.search(rf"\b{row['label']}\b", row["text"], re.IGNORECASE), row


def _cell(plug: float, zs: float, full: float, emu: float) -> dict[str, Any]:
    rows = [{"full_zs": zs, "emu_zs": zs, "emu_ft": emu, "plug_in": plug, "full_ft": full}]
    return recipe_tuning.summarize(rows)


def test_recipes_rank_by_the_worst_tasks_share_of_the_best_full_ft_gain() -> None:
    report = {
        "results": {
            "a": {"default": _cell(90, 40, 100, 80), "lr1e-3": _cell(70, 40, 100, 60)},
            # lr1e-3 is worse on a but better on b, and its worst task beats default's
            "b": {"default": _cell(45, 40, 90, 40), "lr1e-3": _cell(75, 40, 80, 60)},
        }
    }
    assert recipe_tuning.ceilings(report) == {"a": 100, "b": 90}
    # b's yardstick is the best full FT on b (90, default's), not lr1e-3's own 80
    assert recipe_tuning.gain_kept(report["results"]["b"]["lr1e-3"], 90) == pytest.approx(0.7)
    ranking = recipe_tuning.rank(report, ["a", "b"])
    assert [r["recipe"] for r in ranking] == ["lr1e-3", "default"]
    assert ranking[0]["worst_gain_kept"] == pytest.approx(0.5)
    assert ranking[1]["mean_margin"] == pytest.approx(7.5)
    # a recipe that hurts full FT does not gain by it: same plug-in, lower own full FT
    worse = {"results": {"a": {"default": _cell(70, 40, 100, 60), "lr4e-3": _cell(70, 40, 80, 60)}}}
    ranked = recipe_tuning.rank(worse, ["a"])
    assert ranked[0]["worst_gain_kept"] == ranked[1]["worst_gain_kept"] == pytest.approx(0.5)
    only_a = recipe_tuning.rank({"results": {"a": report["results"]["a"]}}, ["a", "b"])
    assert only_a == []  # a recipe not measured on every task is not ranked


def _metrics(plug: float) -> dict[str, Any]:
    """A finished run's metrics as offsite simulate writes them (the keys the bench reads)."""
    scores = {key: {"value": 0.5} for _, key, _ in recipe_tuning.SETTINGS}
    scores["plug_in"] = {"value": plug}
    run = {"plan": "1-26-3", "eval_examples": 300, "bundle_bytes": 1}
    return {"run": run, "scores": scores, "timings": {}}


def test_a_checkout_without_run_folders_keeps_the_committed_seeds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bench/out is not in git: the committed report's seeds survive a fresh checkout, a run
    folder on disk adds its seed, and recipes not asked for keep their rows."""
    from coordinator.state.folder import RunFolder

    monkeypatch.setattr(recipe_tuning, "REPORTS", tmp_path / "reports")
    monkeypatch.setattr(recipe_tuning, "WORK", tmp_path / "out")
    committed: dict[str, Any] = {"results": {}}
    for task in ("a", "b"):
        for recipe in ("default", "lr1e-3"):
            committed["results"].setdefault(task, {})[recipe] = recipe_tuning.summarize(
                [
                    {
                        "seed": 0,
                        "full_zs": 20,
                        "emu_zs": 20,
                        "emu_ft": 50,
                        "plug_in": 40,
                        "full_ft": 80,
                    }
                ]
            )
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "recipe_tuning.json").write_text(json.dumps(committed))
    folder = RunFolder(tmp_path / "out" / "a" / "default" / "seed-1").metrics_path
    folder.parent.mkdir(parents=True)
    folder.write_text(json.dumps(_metrics(plug=0.6)))

    report: dict[str, Any] = {}
    recipe_tuning._collect(report, ["a", "b"], ["default"])
    default_a = report["results"]["a"]["default"]
    assert [r["seed"] for r in default_a["per_seed"]] == [0, 1]
    assert default_a["plug_in"]["mean"] == pytest.approx(50)
    assert report["results"]["b"]["lr1e-3"]["seeds"] == 1  # not asked for, still reported
    assert {r["recipe"] for r in report["ranking"]} == {"default", "lr1e-3"}
    # a seed the committed report holds is not run again on a fresh checkout
    assert 0 in recipe_tuning._committed_rows()["b", "lr1e-3"]
