"""The C allocator of the processes that train: jemalloc where one is installed, else glibc's.

A training step allocates and frees hundreds of 1–6 MB temporaries in a different order each
time. glibc's malloc serves them from its heap once its dynamic mmap threshold has risen, and the
holes they leave keep the process's high-water mark far above what is live; jemalloc's size
classes and page purging do not. The client benchmark measures both allocators side by side
(column 'allocator' of bench/reports/client.md): a lower peak at the same speed, for the client
and for full fine-tuning alike. Its tuning knobs were tried and left at their defaults (a zero
dirty-page decay saves a little more memory at a large cost in speed).

An allocator is fixed when a process starts (``LD_PRELOAD``), so this applies to processes we
launch: a data owner's SuperNode (and the ClientApps it starts) and the benchmark's cells. The
library ships inside Ray's wheel (a dependency of Flower's simulation engine) and in Debian's
``libjemalloc2``; ``OFFSITE_JEMALLOC`` names another one.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, get_args

from offsite.errors import OffsiteError

Allocator = Literal["auto", "jemalloc", "system"]
ALLOCATORS: tuple[str, ...] = get_args(Allocator)
_SYSTEM_LIBRARIES = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/lib/libjemalloc.so.2",
)


def _ray_library() -> Path | None:
    spec = importlib.util.find_spec("ray")  # finds the package without importing it
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / "core" / "libjemalloc.so"
        if candidate.is_file():
            return candidate
    return None


def jemalloc_library() -> Path | None:
    """The jemalloc shared library to preload: ``$OFFSITE_JEMALLOC``, Ray's copy, or the
    system's; None when there is none (or not on Linux, where ``LD_PRELOAD`` does not apply)."""
    named = os.environ.get("OFFSITE_JEMALLOC")
    if named:
        if not Path(named).is_file():
            raise OffsiteError(
                f"OFFSITE_JEMALLOC={named} is not a file: point it at a libjemalloc.so or unset it"
            )
        return Path(named)
    if not sys.platform.startswith("linux"):
        return None
    found = _ray_library()
    if found is not None:
        return found
    return next((Path(p) for p in _SYSTEM_LIBRARIES if Path(p).is_file()), None)


def allocator_env(env: Mapping[str, str], allocator: Allocator = "auto") -> dict[str, str]:
    """``env`` for a child process that should allocate with ``allocator``.

    ``auto`` preloads jemalloc when one is found and leaves the system allocator otherwise;
    ``jemalloc`` insists (an error says how to install it); ``system`` removes a jemalloc
    preload inherited from our own environment.
    """
    if allocator not in ALLOCATORS:
        raise OffsiteError(f"unknown allocator {allocator!r}: use one of {', '.join(ALLOCATORS)}")
    out = dict(env)
    preload = [p for p in out.get("LD_PRELOAD", "").replace(":", " ").split() if p]
    preload = [p for p in preload if "jemalloc" not in Path(p).name]
    library = None if allocator == "system" else jemalloc_library()
    if library is None and allocator == "jemalloc":
        raise OffsiteError(
            "no jemalloc library found: install Ray (pip install 'flwr[simulation]') or "
            "Debian's libjemalloc2, or set OFFSITE_JEMALLOC=/path/to/libjemalloc.so"
        )
    if library is not None:
        preload.insert(0, str(library))
    if preload:
        out["LD_PRELOAD"] = " ".join(preload)
    else:
        out.pop("LD_PRELOAD", None)
    return out


def active_allocator(pid: int | str = "self") -> str:
    """'jemalloc' when process ``pid`` has jemalloc mapped, else 'system'."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return "system"
    return "jemalloc" if "libjemalloc" in maps else "system"
