"""Bundles as one deterministic tar (for content addressing and resumable transfer)."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path


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
    """Extract a bundle tar: flat regular files with safe names only, nothing else."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive_path, "r:") as archive:
        for member in archive.getmembers():
            name = member.name
            if not member.isfile() or "/" in name or "\\" in name or name in {"", ".", ".."}:
                raise ValueError(f"bundle archive holds an unsafe entry {name!r}")
            source = archive.extractfile(member)
            assert source is not None
            with (dest / name).open("wb") as handle:
                while block := source.read(1 << 20):
                    handle.write(block)
