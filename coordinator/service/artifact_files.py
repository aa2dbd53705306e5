"""Content-addressed artifact files on the coordinator's disk (``<state>/artifacts/<sha256>``).

A bundle travels as one deterministic tar of its folder (sorted names, zeroed owners and
times), so its sha256 is stable and a download can resume by byte offset.
"""

from __future__ import annotations

import os
from pathlib import Path

from emulator.digest import file_sha256
from offsite.archive import pack_bundle
from offsite.digests import is_sha256

CHUNK = 4 * 1024 * 1024 - 64 * 1024  # chunk + framing stays under gRPC's default 4 MiB limit


class ArtifactFiles:
    """The artifact folder: files named by their sha256, written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        if not is_sha256(digest):
            raise ValueError(f"{digest!r} is not a sha256 digest")
        return self.root / digest

    def add_bundle(self, bundle_dir: Path) -> tuple[str, int]:
        """Pack and store a bundle; returns (digest, size)."""
        scratch = self.root / ".incoming-bundle"
        pack_bundle(bundle_dir, scratch)
        scratch.chmod(0o600)  # the coordinator's file: nodes get it over mutual TLS only
        digest = file_sha256(scratch)
        os.replace(scratch, self.root / digest)
        return digest, (self.root / digest).stat().st_size
