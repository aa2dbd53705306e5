"""The run folder: its layout has one owner, and its records survive partial runs."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from coordinator.state import folder as run_folder
from coordinator.state.folder import RunFolder
from coordinator.state.plan import RunPlan
from offsite.config import load_config
from offsite.errors import DataError

ROOT = Path(__file__).resolve().parents[2]
LAYOUT_FILES = {
    run_folder.CONFIG,
    run_folder.PLAN,
    run_folder.CLIENT_REPORTS,
    run_folder.OUTCOMES,
    run_folder.METRICS,
    run_folder.REPORT,
    run_folder.FLOWER_LOG,
    "five_way.png",
    "loss_per_round.png",
}
LAYOUT_FOLDERS = {"adapters", "export", "peft", run_folder.REGISTRY, "bundle", "data", "lm-eval"}
# Flower's own home folder (not a run folder) also holds a config.toml: FlowerLink owns that one
# (bench/transfer.py sets one up for its SuperLink); an export folder's layout is export.py's;
OTHER_OWNERS = {
    "coordinator/service/flower_link.py": {run_folder.CONFIG},
    "bench/transfer.py": {run_folder.CONFIG},
    "coordinator/serve/export.py": {"peft"},
    "offsite/data.py": {"data"},  # the installed catalog packages' own data folders
}


def _layout_literals(path: Path) -> set[str]:
    """Run-folder file names anywhere in ``path``'s code (docstrings aside), and folder names
    or ``round-…`` parts joined onto a path with ``/``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    found = {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and node.value in LAYOUT_FILES
        and id(node) not in docstrings
    }
    for node in ast.walk(tree):
        if not (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)):
            continue
        right = node.right
        if isinstance(right, ast.JoinedStr) and right.values:
            right = right.values[0]
        if (
            isinstance(right, ast.Constant)
            and isinstance(right.value, str)
            and (right.value in LAYOUT_FOLDERS or right.value.startswith("round-"))
        ):
            found.add(right.value)
    return found


def test_only_the_run_folder_module_knows_the_layout() -> None:
    """No run-folder file or folder name outside ``coordinator/state/folder.py`` (help texts and
    docstrings may still name files for the user)."""
    offenders = []
    for package in ("offsite", "coordinator", "client", "emulator", "bench"):
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if relative == "coordinator/state/folder.py" or "/wire/v1/" in relative:
                continue
            found = _layout_literals(path) - OTHER_OWNERS.get(relative, set())
            if found:
                offenders.append(f"{relative}: {sorted(found)}")
    assert not offenders, offenders


def test_a_new_folder_never_reuses_an_existing_one(tmp_path: Path) -> None:
    config = load_config(None, [f"output_dir={tmp_path}"])
    first, second = RunFolder.new(config), RunFolder.new(config)
    assert first.path != second.path and first.path.is_dir() and second.path.is_dir()
    assert first.path.parent == tmp_path.resolve()


def test_the_config_is_stored_once_and_read_back_typed(tmp_path: Path) -> None:
    config = load_config(None, ["federation.rounds=7", "seed=3"])
    folder = RunFolder.at(tmp_path / "run")
    folder.write_config(config)
    assert folder.config() == config
    folder.save_plan(
        RunPlan(str(folder.path), "b", "d" * 64, "", "classification", ("a", "b"), "{text}")
    )
    saved = json.loads(folder.plan_path.read_text())
    assert "config" not in saved and folder.can_resume
    assert folder.plan().labels == ("a", "b")


def test_a_plan_written_before_the_config_was_stored_once_still_loads(tmp_path: Path) -> None:
    old = {
        "run_dir": str(tmp_path),
        "bundle_path": "b",
        "bundle_digest": "d" * 64,
        "data_dir": "",
        "task_kind": "classification",
        "labels": ["x"],
        "template": "{text}",
        "config": {"seed": 0},
    }
    (tmp_path / run_folder.PLAN).write_text(json.dumps(old))
    plan = RunFolder(tmp_path).plan()
    assert plan.labels == ("x",) and plan.registry == ""


def test_a_folder_that_is_not_a_run_says_so_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"is not a run folder \(no config.toml\); pass") as err:
        RunFolder.existing(tmp_path)
    assert "\n" not in str(err.value)


def test_round_files_and_records(tmp_path: Path) -> None:
    folder = RunFolder.at(tmp_path)
    assert folder.adapter_rounds() == [] and folder.client_reports() == []
    for number in (0, 2, 10, 1):
        folder.adapter_path(number).parent.mkdir(exist_ok=True)
        folder.adapter_path(number).write_bytes(b"")
    (folder.adapter_path(0).parent / "round-x.safetensors").write_bytes(b"")
    assert folder.adapter_rounds() == [0, 1, 2, 10]
    folder.write_outcomes([{"round": 1, "outcome": "aggregated 2 updates"}])
    assert folder.outcomes() == [{"round": 1, "outcome": "aggregated 2 updates"}]
    assert not list(tmp_path.glob("*.tmp")), "the atomic write left its temporary file"
    folder.client_reports_path.write_text('[{"round": 1}, "not a record"')  # cut short
    assert folder.client_reports() == []
