"""The docs' reference pages, generated from the code (never copied by hand).

``mkdocs.yml`` loads this file as a hook: ``on_files`` adds four pages to every build,

- ``reference/cli.md``: every ``offsite`` command, sub-command, argument and flag, walked from
  the Typer (Click) application in ``offsite.cli.main``;
- ``reference/configuration.md``: every configuration key with its type, default and help text,
  from the dataclasses in ``offsite.config`` (their field metadata and docstrings);
- ``reference/exit-codes.md``: ``offsite.errors.ExitCode`` and its meanings;
- ``reference/wire.md``: the gRPC services and messages of ``proto/offsite/v1/*.proto`` with
  their comments, read from a descriptor set protoc writes (``--include_source_info``).

``python scripts/docs_reference.py OUT`` writes the same pages into ``OUT`` (to read them
without building the site); ``tests/test_docs.py`` checks them against the code.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import typing
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # mkdocs loads this hook by path, from any working directory
    sys.path.insert(0, str(ROOT))

GENERATED_NOTE = (
    '!!! note "Generated"\n    This page is generated from {source} on every `make docs`; '
    "edit the source, not this page.\n"
)


def _cell(text: object) -> str:
    """Markdown table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _code(text: object) -> str:
    value = str(text)
    tick = "``" if "`" in value else "`"
    pad = " " if "`" in value else ""
    return f"{tick}{pad}{value}{pad}{tick}"


# --------------------------------------------------------------------------- CLI


def cli_commands() -> list[tuple[str, Any]]:
    """Every command of the ``offsite`` CLI as (full name, click command), groups included."""
    import click
    import typer.main

    from offsite.cli.main import app

    root = typer.main.get_command(app)
    out: list[tuple[str, Any]] = []

    def walk(name: str, command: click.Command) -> None:
        out.append((name, command))
        if isinstance(command, click.Group):
            ctx = click.Context(command, info_name=name)
            for sub in command.list_commands(ctx):
                child = command.get_command(ctx, sub)
                if child is not None and not child.hidden:
                    walk(f"{name} {sub}", child)

    walk("offsite", root)
    return out


def _argument_help(command: Any, name: str) -> str:
    """An argument's help from its ``typer.Argument(help=...)``: Click 8.5's ``Argument``
    resets the ``help`` Typer 0.20 sets on it, so read it where it was declared."""
    import inspect

    import typer.models

    function = getattr(command.callback, "__wrapped__", command.callback)
    if function is None:
        return ""
    hints = typing.get_type_hints(function, include_extras=True)
    for extra in getattr(hints.get(name), "__metadata__", ()):
        if isinstance(extra, typer.models.ArgumentInfo):
            return extra.help or ""
    default = inspect.signature(function).parameters[name].default
    return getattr(default, "help", None) or ""


def _param_row(command: Any, param: Any) -> str:
    import click

    text = getattr(param, "help", None) or ""
    if isinstance(param, click.Argument):
        text = text or _argument_help(command, param.name)
        name = _code(param.human_readable_name)
        kind = "argument" + (", repeatable" if param.nargs == -1 else "")
        default = "required" if param.required else "optional"
    else:
        flags = [*param.opts, *param.secondary_opts]
        name = " / ".join(_code(flag) for flag in flags)
        kind = "flag" if param.is_flag else param.type.name.lower()
        if param.multiple:
            kind += ", repeatable"
        if param.required:
            default = "required"
        elif param.default is None or param.default == ():
            default = ""
        else:
            default = _code(param.default)
        if param.envvar:
            default += f" (env {_code(param.envvar)})"
    return f"| {name} | {_cell(kind)} | {default} | {_cell(text)} |"


def cli_markdown() -> str:
    """The CLI reference page."""
    import click

    from offsite.errors import exit_code_table

    lines = [
        "# Command line",
        "",
        GENERATED_NOTE.format(source="the Typer application in `offsite/cli`"),
        "Every command prints the same text with `--help`. Configuration overrides "
        "(`section.key=value`) are listed in the [configuration reference](configuration.md); "
        "exit codes in [exit codes](exit-codes.md).",
        "",
    ]
    for name, command in cli_commands():
        depth = 2 if name.count(" ") <= 1 else 3
        lines += [f"{'#' * depth} `{name}`", ""]
        text = (command.help or "").strip()
        if name == "offsite":
            text += f"\n\nExit codes: {exit_code_table()}."
        if text:
            lines += [text.replace("\b\n", ""), ""]
        ctx = click.Context(command, info_name=name)
        usage = " ".join(command.collect_usage_pieces(ctx))
        lines += ["```text", f"{name} {usage}".rstrip(), "```", ""]
        params = [p for p in command.params if p.name != "help"]
        if params:
            lines += ["| argument / flag | type | default | meaning |", "|---|---|---|---|"]
            lines += [_param_row(command, p) for p in params]
            lines.append("")
        if getattr(command, "ignore_unknown_options", False) or command.context_settings.get(
            "ignore_unknown_options"
        ):
            lines += [
                "Its options are the benchmark script's own: they pass through unchanged "
                f"(`{name} --help` lists them).",
                "",
            ]
        if isinstance(command, click.Group):
            subs = command.list_commands(ctx)
            lines += [
                "| command | what it does |",
                "|---|---|",
                *(
                    f"| [`{name} {sub}`](#{_anchor(f'{name} {sub}')}) | "
                    f"{_cell(command.get_command(ctx, sub).get_short_help_str(200))} |"  # type: ignore[union-attr]
                    for sub in subs
                ),
                "",
            ]
    return "\n".join(lines)


def _anchor(title: str) -> str:
    """The id Python-Markdown's toc extension gives a heading ``title`` (in backticks)."""
    return "-".join(title.lower().split())


# --------------------------------------------------------------------------- configuration


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    return getattr(annotation, "__name__", str(annotation))


def config_keys() -> list[tuple[str, str, Any, str]]:
    """Every configuration key: (dotted key, type, default, help), in declaration order."""
    from offsite.config import OffsiteConfig

    rows: list[tuple[str, str, Any, str]] = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")
            else:
                default = f.default if f.default is not dataclasses.MISSING else None
                rows.append(
                    (
                        f"{prefix}{f.name}",
                        _type_name(hints[f.name]),
                        default,
                        f.metadata.get("help", ""),
                    )
                )

    walk(OffsiteConfig, "")
    return rows


def _sections() -> list[tuple[str, type]]:
    from offsite.config import OffsiteConfig

    hints = typing.get_type_hints(OffsiteConfig)
    return [
        (f.name, hints[f.name])
        for f in dataclasses.fields(OffsiteConfig)
        if dataclasses.is_dataclass(hints[f.name])
    ]


def _toml(value: Any) -> str:
    import tomli_w

    return tomli_w.dumps({"v": value}).strip().removeprefix("v = ")


def config_markdown() -> str:
    """The configuration reference page: one table per section."""
    import inspect

    keys = config_keys()
    lines = [
        "# Configuration",
        "",
        GENERATED_NOTE.format(source="the dataclasses in `offsite/config.py`"),
        "One TOML file (`offsite simulate -c my.toml`) and/or `section.key=value` overrides on "
        "the command line; later wins. Unknown keys, wrong types and out-of-range values are "
        "all reported at once (exit code 2). `offsite config` prints this list in the terminal.",
        "",
        "```toml",
        "# my.toml: only what differs from the defaults",
        "[federation]",
        "rounds = 5",
        "",
        "[train]",
        "lr = 1e-3",
        "```",
        "",
        "## Top level",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {_code(k)} | {_cell(t)} | {_code(_toml(d))} | {_cell(h)} |"
        for k, t, d, h in keys
        if "." not in k
    ]
    lines.append("")
    for section, cls in _sections():
        doc = inspect.getdoc(cls) or ""
        if doc.startswith(cls.__name__ + "("):  # dataclass's generated signature, no docstring
            doc = ""
        lines += [f"## `[{section}]`", ""]
        if doc:
            lines += [doc, ""]
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        lines += [
            f"| {_code(k)} | {_cell(t)} | {_code(_toml(d))} | {_cell(h)} |"
            for k, t, d, h in keys
            if k.startswith(section + ".")
        ]
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- exit codes


def exit_codes_markdown() -> str:
    """The exit-code table, from ``offsite.errors``."""
    from offsite.errors import EXIT_CODE_MEANINGS, ExitCode

    lines = [
        "# Exit codes",
        "",
        GENERATED_NOTE.format(source="`offsite.errors.ExitCode`"),
        "Every `offsite` command exits 0 on success. An error prints one line, `error: what "
        "is wrong; what to do`, on standard error and exits with its class's code:",
        "",
        "| code | name | meaning |",
        "|---:|---|---|",
        "| 0 | | success |",
        *(
            f"| {int(code)} | `{code.name}` | {_cell(EXIT_CODE_MEANINGS[code])} |"
            for code in ExitCode
        ),
        "",
        "The error classes that carry these codes are in the [Python API](api.md#offsite.errors).",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- wire protocol

# FileDescriptorProto field numbers (descriptor.proto): the paths of SourceCodeInfo locations
_MESSAGE, _SERVICE, _FIELD, _METHOD = 4, 6, 2, 2


def _descriptors() -> Any:
    """A FileDescriptorSet of ``proto/offsite/v1`` with comments (protoc from grpc_tools)."""
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    from offsite.wire.generate import PROTO_ROOT, PROTOS

    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "set.pb"
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"--descriptor_set_out={out}",
            "--include_source_info",
            *(str(p) for p in PROTOS),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed on proto/offsite/v1; see its message above")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _comment(location: Any) -> str:
    text = (location.leading_comments or "") + " " + (location.trailing_comments or "")
    return " ".join(text.split())


def wire_markdown() -> str:
    """The wire-protocol page: services, RPCs and messages with their comments."""
    from google.protobuf import descriptor_pb2

    field_types = {
        value: name.removeprefix("TYPE_").lower()
        for name, value in descriptor_pb2.FieldDescriptorProto.Type.items()
    }
    lines = [
        "# Wire protocol",
        "",
        GENERATED_NOTE.format(source="`proto/offsite/v1/*.proto`"),
        "The coordinator's own gRPC services (enrollment and artifacts). The `.proto` files are "
        "the versioned contract; Python code is generated into `offsite/wire/v1` by "
        "`python -m offsite.wire.generate` (a test fails on drift) and converted to domain "
        "objects in `offsite.wire.serde` alone. Adapters and round results travel in Flower "
        "messages instead ([`offsite.wire.messages`](api.md#offsite.wire.messages)).",
        "",
    ]
    for file in _descriptors().file:
        comments = {tuple(loc.path): loc for loc in file.source_code_info.location}
        header = " ".join(
            " ".join(c.split()) for c in comments.get((12,), _Empty()).leading_detached_comments
        )
        lines += [f"## `{file.name}`", "", f"Package `{file.package}`. {header}".strip(), ""]
        for s, service in enumerate(file.service):
            lines += [f"### service `{service.name}`", ""]
            lines += ["| RPC | request | response | notes |", "|---|---|---|---|"]
            for m, method in enumerate(service.method):
                note = _comment(comments.get((_SERVICE, s, _METHOD, m), _Empty()))
                stream_in = "stream " if method.client_streaming else ""
                stream_out = "stream " if method.server_streaming else ""
                lines.append(
                    f"| `{method.name}` | {stream_in}`{method.input_type.split('.')[-1]}` | "
                    f"{stream_out}`{method.output_type.split('.')[-1]}` | {_cell(note)} |"
                )
            lines.append("")
        for i, message in enumerate(file.message_type):
            lines += [f"### message `{message.name}`", ""]
            note = _comment(comments.get((_MESSAGE, i), _Empty()))
            if note:
                lines += [note, ""]
            lines += ["| # | field | type | notes |", "|---:|---|---|---|"]
            for j, f in enumerate(message.field):
                kind = f.type_name.split(".")[-1] if f.type_name else field_types[f.type]
                if f.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED:
                    kind = f"repeated {kind}"
                note = _comment(comments.get((_MESSAGE, i, _FIELD, j), _Empty()))
                lines.append(f"| {f.number} | `{f.name}` | `{kind}` | {_cell(note)} |")
            lines.append("")
    return "\n".join(lines)


class _Empty:
    leading_comments = ""
    trailing_comments = ""
    leading_detached_comments: tuple[str, ...] = ()


# --------------------------------------------------------------------------- the hook

PAGES = {
    "reference/cli.md": cli_markdown,
    "reference/configuration.md": config_markdown,
    "reference/exit-codes.md": exit_codes_markdown,
    "reference/wire.md": wire_markdown,
}


def on_files(files: Any, config: Any) -> Any:
    """MkDocs hook: add the generated reference pages to the build."""
    from mkdocs.structure.files import File

    for uri, render in PAGES.items():
        files.append(File.generated(config, uri, content=render()))
    return files


def main() -> None:
    """Write the generated pages into the folder given as the first argument."""
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "site-reference")
    for uri, render in PAGES.items():
        target = out / uri
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(render(), encoding="utf-8")
        print(target)


if __name__ == "__main__":
    main()
