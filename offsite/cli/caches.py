"""``offsite cache``: what the reuse caches hold, and emptying them.

Each cache is rebuilt when a run needs it: emulator bundles (``$OFFSITE_BUNDLES``), full-model
baseline scores (``$OFFSITE_BASELINES``) and the frozen tensors a host's workers share
(``$OFFSITE_FROZEN``). Clearing removes only the entries Offsite writes there (a folder pointed
at by mistake loses nothing else) and only from a folder that is the user's alone.
"""

from __future__ import annotations

import enum
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from offsite.errors import ConfigError, OffsiteError
from offsite.host.paths import baseline_folder, bundle_folder, frozen_folder, private_folder


class CacheName(str, enum.Enum):
    bundles = "bundles"
    baselines = "baselines"
    frozen = "frozen"
    all = "all"


@dataclass(frozen=True)
class _Cache:
    folder: Callable[[], Path | None]
    what: str
    variable: str
    entries: tuple[str, ...]  # globs of one entry
    leftovers: tuple[str, ...]  # globs of what else Offsite writes there (staging, temporaries)
    folders: bool = False  # an entry is a folder (a file of the same glob is a leftover)


_CACHES = {
    CacheName.bundles: _Cache(
        bundle_folder,
        "emulator bundles later runs copy",
        "$OFFSITE_BUNDLES",
        ("[0-9a-f]" * 8 + "*",),
        ("[0-9a-f]" * 8 + "*.digest", ".bundle-*"),
        folders=True,
    ),
    CacheName.baselines: _Cache(
        baseline_folder,
        "full-model baseline scores",
        "$OFFSITE_BASELINES",
        ("*.json",),
        (".baseline-*",),
    ),
    CacheName.frozen: _Cache(
        frozen_folder,
        "frozen tensors a host's workers share",
        "$OFFSITE_FROZEN",
        ("*.safetensors",),
        (".frozen-*",),
    ),
}


def _matches(folder: Path, globs: tuple[str, ...]) -> list[Path]:
    return sorted({path for pattern in globs for path in folder.glob(pattern)})


def _size(paths: list[Path]) -> int:
    files = [p for path in paths for p in ([path] if path.is_file() else path.rglob("*"))]
    return sum(p.stat().st_size for p in files if p.is_file() and not p.is_symlink())


def cache(
    clear: Annotated[
        list[CacheName] | None,
        typer.Option(
            "--clear",
            help="Empty a cache (or all); repeatable. Everything there is rebuilt when a run "
            "needs it; the prepared models are not touched.",
        ),
    ] = None,
) -> None:
    """What Offsite's caches hold (folder, entries, size), and emptying them (`--clear`)."""
    chosen = set(_CACHES) if CacheName.all in (clear or []) else set(clear or [])
    for name, spec in _CACHES.items():
        folder = spec.folder()
        if folder is None:
            typer.echo(f"{name.value:10} off ({spec.variable}=off)")
            continue
        found = _matches(folder, spec.entries) if folder.is_dir() else []
        entries = [p for p in found if p.is_dir() == spec.folders]
        size = _size(entries) / 2**20
        if name not in chosen:
            typer.echo(
                f"{name.value:10} {len(entries):3} entries {size:9.1f} MB  {folder}  "
                f"({spec.what}, {spec.variable})"
            )
            continue
        if entries and not private_folder(folder, f"{name.value} cache", spec.variable):
            raise ConfigError(f"{folder} is not yours alone: not cleared (`chmod go-w` it)")
        try:
            for path in [*entries, *_matches(folder, spec.leftovers)] if entries else []:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
        except OSError as err:
            raise OffsiteError(f"could not clear {folder}: {err}") from err
        typer.echo(f"{name.value:10} cleared {len(entries)} entries, {size:.1f} MB  {folder}")
