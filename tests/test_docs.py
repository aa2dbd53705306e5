"""The documentation against the code: the generated reference covers every configuration key,
command and flag; every override and command the guides show is one that parses; and every
shell block of the quickstart and the "your own data" guide runs, on a tiny model.

The site itself (`mkdocs build --strict`: broken links, missing pages) is built by `make docs`,
which `make test` runs first.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# The guides whose shell blocks a newcomer copies first: each block runs (or says why not).
CHECKED_GUIDES = ("quickstart.md", "your-data.md")
MARK = re.compile(r"<!-- docs-check: (run|skip \(.+?\)) -->\n```bash\n(.*?)```", re.S)
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def _reference() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "docs_reference", ROOT / "scripts" / "docs_reference.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pages() -> dict[str, str]:
    return {p.relative_to(DOCS).as_posix(): p.read_text() for p in sorted(DOCS.rglob("*.md"))}


# --------------------------------------------------------------------------- the reference


def test_every_config_key_is_in_the_configuration_reference() -> None:
    from offsite.config import describe

    reference = _reference()
    page = reference.config_markdown()
    keys = [key for key, _default, _help in describe()]
    assert len(keys) > 50
    missing = [key for key in keys if f"| `{key}` |" not in page]
    assert not missing, f"configuration keys missing from the reference: {missing}"
    # with their help text, and none without one (help lives in the dataclasses' metadata)
    undocumented = [key for key, _t, _d, text in reference.config_keys() if not text.strip()]
    assert not undocumented, f"config keys without help text in offsite/config.py: {undocumented}"


def test_every_command_and_flag_is_in_the_cli_reference() -> None:
    import click

    reference = _reference()
    page = reference.cli_markdown()
    commands = reference.cli_commands()
    names = {name for name, _command in commands}
    # the commands a user reaches, found independently of the generator's walk
    assert {
        "offsite simulate",
        "offsite run",
        "offsite emulator build",
        "offsite coordinator serve",
        "offsite client join",
        "offsite client plan",
        "offsite bench emulator",
        "offsite serve",
        "offsite export",
    } <= names
    problems = []
    for name, command in commands:
        if f"`{name}`" not in page:
            problems.append(f"command {name}")
        for param in command.params:
            if param.name == "help":
                continue
            if isinstance(param, click.Option):
                flags = [*param.opts, *param.secondary_opts]
            else:
                flags = [param.human_readable_name]
            problems += [f"{name} {flag}" for flag in flags if f"`{flag}`" not in page]
    assert not problems, f"missing from the CLI reference: {problems}"


def test_every_argument_has_help_in_the_cli_reference() -> None:
    """Argument help is read from the Typer declarations (Click 8.5 drops it on the object)."""
    reference = _reference()
    rows = [
        line
        for line in reference.cli_markdown().splitlines()
        if "| argument" in line and "argument / flag" not in line
    ]
    assert rows and all(not line.rstrip().endswith("|  |") for line in rows), rows


def test_exit_codes_and_wire_protocol_pages_cover_their_sources() -> None:
    from offsite.errors import ExitCode

    reference = _reference()
    codes = reference.exit_codes_markdown()
    assert all(f"| {int(code)} | `{code.name}` |" in codes for code in ExitCode)
    wire = reference.wire_markdown()
    for proto in sorted((ROOT / "proto" / "offsite" / "v1").glob("*.proto")):
        text = proto.read_text()
        for kind, name in re.findall(r"^(service|message) (\w+)", text, re.M):
            assert f"### {kind} `{name}`" in wire, (proto.name, name)
        for rpc in re.findall(r"^\s*rpc (\w+)\(", text, re.M):
            assert f"| `{rpc}` |" in wire, (proto.name, rpc)
    # a field's trailing comment reaches the page
    assert "sha256, 64 lowercase hex characters" in wire


def test_the_api_page_names_modules_that_exist() -> None:
    page = (DOCS / "reference" / "api.md").read_text()
    modules = re.findall(r"^::: ([\w.]+)", page, re.M)
    assert modules
    for module in modules:
        path = ROOT / Path(*module.split("."))
        assert path.with_suffix(".py").is_file() or (path / "__init__.py").is_file(), module


# --------------------------------------------------------------------------- what the guides show


def _offsite_invocations() -> list[tuple[str, list[str]]]:
    """Every ``offsite …`` command line in the docs' shell blocks and the README, as argv."""
    texts = {**_pages(), "README.md": (ROOT / "README.md").read_text()}
    found = []
    for page, text in texts.items():
        for language, block in FENCE.findall(text):
            if language not in ("bash", "sh", ""):
                continue
            joined = block.replace("\\\n", " ")
            for line in joined.splitlines():
                code = line.split(" #", 1)[0].strip()
                for part in re.split(r"&&|;|\|", code):
                    words = part.strip().split()
                    if words[:1] == ["offsite"] and len(words) > 1:
                        found.append((page, words[1:]))
    return found


def test_every_offsite_command_shown_in_the_docs_exists_with_its_flags() -> None:
    """Command paths and flags of every shown ``offsite`` line parse against the real CLI."""
    import click

    reference = _reference()
    commands = dict(reference.cli_commands())
    invocations = _offsite_invocations()
    assert len(invocations) > 20
    problems = []
    for page, words in invocations:
        path = "offsite"
        rest = list(words)
        while rest and f"{path} {rest[0]}" in commands:
            path = f"{path} {rest.pop(0)}"
        command = commands[path]
        if isinstance(command, click.Group) and path != "offsite":
            problems.append(f"{page}: `offsite {' '.join(words)}` names no command")
            continue
        if command.context_settings.get("ignore_unknown_options"):
            continue  # a benchmark script's own options
        known = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
        known.add("--help")
        for word in rest:
            flag = word.split("=", 1)[0]
            if flag.startswith("-") and flag not in known:
                problems.append(f"{page}: `{path}` has no flag {flag}")
    assert not problems, problems


OVERRIDE = re.compile(r"(?<![\w.$/-])((?:[a-z_]+\.)?[a-z_]+)=(\"[^\"]*\"|'[^']*'|[^\s`|)]+)")


def test_every_override_shown_in_the_docs_is_a_valid_setting() -> None:
    """``section.key=value`` in the docs' code (inline or blocks) loads as a configuration."""
    from offsite.config import describe, load_config
    from offsite.errors import ConfigError

    keys = {key for key, _default, _help in describe()}
    sections = {key.split(".")[0] for key in keys if "." in key}
    texts = {**_pages(), "README.md": (ROOT / "README.md").read_text()}
    checked, problems = 0, []
    for page, text in texts.items():
        code = re.findall(r"`([^`\n]+)`", text) + [b for _l, b in FENCE.findall(text)]
        for snippet in code:
            for key, value in OVERRIDE.findall(snippet):
                if "." not in key or key.split(".")[0] not in sections:
                    continue  # not a setting (e.g. a Python keyword argument)
                if value == "…" or re.fullmatch(r"[a-z]", value):
                    continue  # a placeholder in prose: `emulator.keep=k`
                if value.startswith("'") and value.endswith("'") and "\\n" in value:
                    problems.append(f"{page}: {key}={value}: a TOML literal keeps \\n as is")
                checked += 1
                if key not in keys:
                    problems.append(f"{page}: {key}={value}: no such setting")
                    continue
                try:
                    load_config(None, [f"{key}={value}"])
                except ConfigError as err:
                    # its own type or range; a combination with other defaults is not its fault
                    if f"{key} must be" in str(err):
                        problems.append(f"{page}: {key}={value}: {err}")
    assert checked > 30
    assert not problems, problems


def test_every_shell_block_of_the_checked_guides_is_marked() -> None:
    """A block the docs test does not run says why; none is forgotten."""
    for guide in CHECKED_GUIDES:
        text = (DOCS / guide).read_text()
        blocks = re.findall(r"^```bash\n", text, re.M)
        marked = MARK.findall(text)
        assert len(marked) == len(blocks), f"{guide}: every ```bash block needs a docs-check mark"
        assert any(kind == "run" for kind, _block in marked), guide


# --------------------------------------------------------------------------- running the guides

# Appended to every `offsite simulate`: the documented overrides that shrink a run to a tiny
# model in seconds (later overrides win, so the guide's own settings stay where these allow).
TINY = [
    "emulator.bottom=1",
    "emulator.top=1",
    "emulator.calibration_examples=8",
    "emulator.public_examples=8",
    "data.eval_size=6",
    "data.max_length=48",
    "federation.num_clients=2",
    "federation.rounds=1",
    "train.local_steps=2",
    "train.batch_size=4",
    "train.precision='fp32'",
    "eval.full_finetune=false",
]
PRELUDE = """set -euo pipefail
offsite() {{
    local extra=()
    if [ "$1" = simulate ] || {{ [ "$1" = emulator ] && [ "${{2:-}}" = build ]; }}; then
        extra=({tiny})
    fi
    {python} -m offsite.cli.main "$@" "${{extra[@]}}"
}}
make() {{  # the Makefile targets the guides use, as the Makefile runs them
    case "$1" in
        simulate) offsite simulate ;;
        *) echo "make $1 is not run by the docs test" >&2; return 1 ;;
    esac
}}
"""


@pytest.mark.integration
@pytest.mark.parametrize("guide", CHECKED_GUIDES)
def test_the_shell_blocks_of_the_guide_run_on_a_tiny_model(
    guide: str, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    blocks = [block for kind, block in MARK.findall((DOCS / guide).read_text()) if kind == "run"]
    work = tmp_path / "work"
    (work / ".venv" / "bin").mkdir(parents=True)
    (work / ".venv" / "bin" / "activate").write_text("")  # the venv is this interpreter's
    tiny = [f"model.name={tiny_llama_dir}", *TINY]
    script = PRELUDE.format(
        tiny=" ".join(shlex.quote(o) for o in tiny), python=shlex.quote(sys.executable)
    )
    script += "\n".join(f"echo '>>> block {i}'\n{block}" for i, block in enumerate(blocks))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
    }
    result = subprocess.run(
        ["bash", "-c", script],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert output.count(">>> block") == len(blocks)
    if guide == "quickstart.md":
        run = next((work / "runs").iterdir())
        assert "| plug-in" in (run / "report.md").read_text()
        assert (run / "export").is_dir()
        assert (work / "bundle" / "manifest.json").is_file()
    else:
        (run,) = (work / "runs").iterdir()
        assert run.name.endswith("-tickets")
        assert "Ticket: {text}\\nDepartment:" in (run / "config.toml").read_text()
        assert "| plug-in" in output
