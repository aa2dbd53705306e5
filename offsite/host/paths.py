"""Where Offsite keeps its caches. ``OFFSITE_HOME`` overrides the default ``~/.cache/offsite``."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)


def offsite_home() -> Path:
    root = os.environ.get("OFFSITE_HOME")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "offsite"


def _cache_folder(variable: str, name: str) -> Path:
    """``$variable`` if set, else ``$OFFSITE_HOME/name``."""
    chosen = os.environ.get(variable)
    return Path(chosen).expanduser() if chosen else offsite_home() / name


def bundle_folder() -> Path:
    """Emulator bundles later runs copy (``coordinator/workflow/bundle_cache.py``):
    ``$OFFSITE_BUNDLES``, else ``$OFFSITE_HOME/bundles``."""
    return _cache_folder("OFFSITE_BUNDLES", "bundles")


def baseline_folder() -> Path:
    """Full-model baseline scores (``coordinator/evaluation/baseline_cache.py``):
    ``$OFFSITE_BASELINES`` (e.g. a folder a team shares), else ``$OFFSITE_HOME/baselines``."""
    return _cache_folder("OFFSITE_BASELINES", "baselines")


FROZEN_OFF = "off"  # $OFFSITE_FROZEN=off: workers keep their own copies


def frozen_folder() -> Path | None:
    """Frozen tensors a host's workers share (``client/shared_frozen.py``): ``$OFFSITE_FROZEN``,
    else ``$OFFSITE_HOME/frozen``; None when ``$OFFSITE_FROZEN`` is ``off``."""
    if os.environ.get("OFFSITE_FROZEN") == FROZEN_OFF:
        return None
    return _cache_folder("OFFSITE_FROZEN", "frozen")


def private_folder(root: Path, what: str, elsewhere: str) -> bool:
    """Whether the cache folder ``root`` is the user's alone (created owner-only if absent): a
    cache others can write into would let them hand this user's runs their files. Logs why
    not, naming ``what`` the folder holds and the variable (``elsewhere``) that moves it."""
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        found = root.stat()
    except OSError as err:
        log.warning("%s %s unavailable (%s): not used", what, root, err)
        return False
    if found.st_uid != os.getuid() or found.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        log.warning(
            "%s %s is not yours alone (owner or write permission): not used; "
            "`chmod go-w` it or point %s elsewhere",
            what,
            root,
            elsewhere,
        )
        return False
    return True


def package_folder(module: str) -> Path | None:
    """Folder of an installed package, found without importing it (some print on import)."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))
