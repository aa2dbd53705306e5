"""The `offsite` command line: help, listings, and one-line errors with exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "FLWR_TELEMETRY_ENABLED": "0"}


def offsite(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "offsite.cli.main", *args],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=cwd,
        timeout=300,
    )


def test_help_lists_the_commands() -> None:
    result = offsite("--help")
    assert result.returncode == 0
    for command in ("simulate", "emulator", "eval", "models", "datasets", "config"):
        assert command in result.stdout


def test_help_lists_every_exit_code() -> None:
    from offsite.errors import exit_code_table

    result = offsite("--help")
    shown = " ".join(result.stdout.split())
    assert " ".join(exit_code_table().split()) in shown
    assert "130 interrupted" in shown and "6 emulator refused" in shown


def test_every_error_takes_its_exit_code_from_the_one_table() -> None:
    """``exit_code = ExitCode.X`` everywhere: no bare number that could mean two things."""
    import ast

    root = Path(__file__).resolve().parents[2]
    loose = []
    for package in ("offsite", "emulator", "client", "coordinator"):
        for path in (root / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                targets = (
                    node.targets
                    if isinstance(node, ast.Assign)
                    else [node.target]
                    if isinstance(node, ast.AnnAssign)
                    else []
                )
                value = getattr(node, "value", None)
                if not any(isinstance(t, ast.Name) and t.id == "exit_code" for t in targets):
                    continue
                named = (
                    isinstance(value, ast.Attribute)
                    and isinstance(value.value, ast.Name)
                    and value.value.id == "ExitCode"
                )
                if not named:
                    loose.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not loose, f"exit codes not taken from offsite.errors.ExitCode: {loose}"


def test_every_benchmark_is_reachable_from_the_cli() -> None:
    from offsite.cli.main import BENCHMARKS

    bench = Path(__file__).resolve().parents[2] / "bench"
    scripts = {  # runnable ones; the others (cells.py, leakage.py) are their shared parts
        path.name for path in bench.glob("*.py") if '__name__ == "__main__"' in path.read_text()
    }
    typed = {"client_matrix.py", "emulator_transfer.py"}  # `offsite bench client` / `emulator`
    assert scripts == {script for script, _ in BENCHMARKS.values()} | typed
    listed = offsite("bench", "--help").stdout
    assert all(name in listed for name in BENCHMARKS)
    passed = offsite("bench", "transfer", "--help")  # the script's own options, passed through
    assert passed.returncode == 0 and "--size-mb" in passed.stdout


def test_simulate_help_explains_defaults() -> None:
    result = offsite("simulate", "--help")
    assert result.returncode == 0 and "five-way" in result.stdout and "--serve-url" in result.stdout
    # arguments carry their help too (not only options): "section.key=value" is the overrides'
    assert "section.key=value" in " ".join(result.stdout.split())


@pytest.mark.parametrize(
    ("command", "fragment"), [("serve", "load_lora_adapter"), ("export", "PEFT")]
)
def test_serving_commands_explain_themselves(command: str, fragment: str) -> None:
    result = offsite(command, "--help")
    assert result.returncode == 0 and fragment in result.stdout


def test_catalog_listings() -> None:
    models, datasets = offsite("models"), offsite("datasets")
    assert "smollm2-135m" in models.stdout and "gemma3-270m" in models.stdout
    assert "bbc-news" in datasets.stdout and "chitchat" in datasets.stdout


def test_config_listing_has_every_section() -> None:
    out = offsite("config").stdout
    for key in (
        "model.name",
        "emulator.keep",
        "train.lr",
        "federation.rounds",
        "eval.full_finetune",
    ):
        assert key in out


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["simulate", "train.lr=oops", "bogus.key=1"], 2, "train.lr must be a number"),
        (["simulate", "model.name=/nonexistent/model"], 4, "does not exist"),
        (["simulate", "data.name=/nonexistent/data.jsonl"], 3, "not found"),
        (["emulator", "verify", "/nonexistent"], 5, "manifest.json is missing"),
        (["simulate", "data.name=bad.jsonl", "data.label_field=topic"], 3, "data.label_field"),
        (["simulate", "data.name=empty.jsonl"], 3, "no examples"),
    ],
)
def test_bad_input_is_one_line_with_exit_code(
    args: list[str], code: int, fragment: str, tmp_path: Path
) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": "x"}\n')
    (tmp_path / "empty.jsonl").write_text("")
    result = offsite(*args, cwd=tmp_path)
    assert result.returncode == code, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_architecture_is_a_model_error(tmp_path: Path) -> None:
    model_dir = tmp_path / "weird"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "mamba"}')
    result = offsite("emulator", "build", "-o", str(tmp_path / "b"), f"model.name={model_dir}")
    assert result.returncode in (4,), result.stderr
    assert "model_type" in result.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["client", "start", "--data", "d.jsonl"],
        ["client", "plan", "bundle", "--memory-budget", "1GB"],
    ],
)
def test_an_unknown_allocator_is_refused_before_anything_starts(
    command: list[str], tmp_path: Path
) -> None:
    result = offsite(*command, "--allocator", "tcmalloc", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "--allocator must be one of auto, jemalloc, system" in result.stderr
    assert "Traceback" not in result.stderr


def test_cache_lists_and_clears_each_cache(tmp_path: Path) -> None:
    """`offsite cache` shows each cache's folder, entries and size; `--clear NAME` empties
    that one only, removing only what Offsite writes there (the folder and anything else in it
    stay); a folder others can write is refused; `OFFSITE_FROZEN=off` shows sharing off."""
    folders = {name: tmp_path / name for name in ("bundles", "baselines", "frozen")}
    key = "ab" * 32
    (folders["bundles"] / key).mkdir(parents=True)
    (folders["bundles"] / key / "model.safetensors").write_bytes(b"x" * 2**20)
    (folders["bundles"] / f"{key}.digest").write_text("abc")
    folders["baselines"].mkdir()
    (folders["baselines"] / "k.json").write_text("{}")
    folders["frozen"].mkdir()
    (folders["frozen"] / "a.safetensors").write_bytes(b"y" * 3 * 2**20)
    (folders["frozen"] / ".frozen-dead").write_bytes(b"z")  # a dead writer's temporary
    (folders["frozen"] / "notes.txt").write_text("not ours")
    for folder in folders.values():
        folder.chmod(0o700)
    env = {f"OFFSITE_{name.upper()}": str(path) for name, path in folders.items()}

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "offsite.cli.main", "cache", *args],
            capture_output=True,
            text=True,
            env={**ENV, **env, **extra},
            timeout=300,
        )

    listed = run()
    assert listed.returncode == 0, listed.stderr
    lines = {line.split()[0]: line.split() for line in listed.stdout.splitlines()}
    assert lines["bundles"][1:5] == ["1", "entries", "1.0", "MB"]
    assert lines["frozen"][1:5] == ["1", "entries", "3.0", "MB"]
    assert lines["baselines"][1:3] == ["1", "entries"]
    cleared = run("--clear", "frozen", "--clear", "baselines")
    assert cleared.returncode == 0, cleared.stderr
    assert "frozen     cleared 1 entries, 3.0 MB" in cleared.stdout
    assert sorted(p.name for p in folders["frozen"].iterdir()) == ["notes.txt"]
    assert not list(folders["baselines"].iterdir())
    assert (folders["bundles"] / key / "model.safetensors").is_file()
    folders["bundles"].chmod(0o777)
    refused = run("--clear", "all")
    assert refused.returncode == 2 and "not yours alone" in refused.stderr
    assert (folders["bundles"] / key).is_dir()
    folders["bundles"].chmod(0o700)
    everything = run("--clear", "all")
    assert everything.returncode == 0 and not list(folders["bundles"].iterdir())
    wrong = run("--clear", "models")
    assert wrong.returncode == 2 and "models" in wrong.stderr
    assert "off (" in run(OFFSITE_FROZEN="off").stdout
