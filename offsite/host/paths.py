"""Where Offsite keeps its caches. ``OFFSITE_HOME`` overrides the default ``~/.cache/offsite``."""

from __future__ import annotations

import os
from pathlib import Path


def offsite_home() -> Path:
    root = os.environ.get("OFFSITE_HOME")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "offsite"


def package_folder(module: str) -> Path | None:
    """Folder of an installed package, found without importing it (some print on import)."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))
