"""Bundles as one deterministic tar (for content addressing and resumable transfer)."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

from offsite.errors import IntegrityError


def pack_bundle(bundle_dir: Path, out: Path) -> None:
    """A deterministic tar of a bundle folder's regular files."""
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(out.name + ".tmp")
    with tarfile.open(temporary, "w", format=tarfile.PAX_FORMAT) as archive:
        for path in sorted(p for p in Path(bundle_dir).iterdir() if p.is_file()):
            info = tarfile.TarInfo(path.name)
            info.size = path.stat().st_size
            info.mode, info.mtime, info.uid, info.gid = 0o644, 0, 0, 0
            info.uname = info.gname = ""
            with path.open("rb") as handle:
                archive.addfile(info, handle)
    os.replace(temporary, out)


def unpack_bundle(archive_path: Path, dest: Path) -> None:
    """Extract a bundle tar: flat regular files with safe names only, nothing else.

    Anything else (not a tar, truncated, links, folders, traversal, duplicate names) is an
    IntegrityError with a one-line reason; ``dest`` may then hold partial files: the caller
    discards it."""
    dest.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    try:
        with tarfile.open(archive_path, "r:") as archive:
            for member in archive:
                name = member.name
                unsafe = "/" in name or "\\" in name or name in {"", ".", ".."} or "\0" in name
                if not member.isfile() or unsafe or name in seen:
                    raise IntegrityError(f"bundle archive holds an unsafe entry {name[:80]!r}")
                seen.add(name)
                source = archive.extractfile(member)
                if source is None:
                    raise IntegrityError(f"bundle archive entry {name[:80]!r} has no data")
                with (dest / name).open("xb") as handle:
                    while block := source.read(1 << 20):
                        handle.write(block)
    except (tarfile.TarError, EOFError, UnicodeError) as err:
        raise IntegrityError(f"bundle archive {archive_path.name} is corrupt: {err}") from err
