"""Content-addressed artifact files on the coordinator's disk (``<state>/artifacts/<sha256>``).

A bundle travels as one deterministic tar of its folder (sorted names, zeroed owners and
times), so its sha256 is stable and a download can resume by byte offset.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from emulator.digest import file_sha256
from offsite.archive import pack_bundle

DIGEST = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 4 * 1024 * 1024 - 64 * 1024  # chunk + framing stays under gRPC's default 4 MiB limit


def is_digest(text: str) -> bool:
    return bool(DIGEST.match(text))


class ArtifactFiles:
    """The artifact folder: files named by their sha256, written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        if not is_digest(digest):
            raise ValueError(f"{digest!r} is not a sha256 digest")
        return self.root / digest

    def add_bundle(self, bundle_dir: Path) -> tuple[str, int]:
        """Pack and store a bundle; returns (digest, size)."""
        scratch = self.root / ".incoming-bundle"
        pack_bundle(bundle_dir, scratch)
        digest = file_sha256(scratch)
        os.replace(scratch, self.root / digest)
        return digest, (self.root / digest).stat().st_size

    def receiver(self, digest: str, size: int) -> Receiver:
        return Receiver(self, digest, size)


class Receiver:
    """Collects an upload; it becomes an artifact only if every byte hashes to ``digest``."""

    def __init__(self, files: ArtifactFiles, digest: str, size: int) -> None:
        self.files, self.digest, self.size = files, digest, size
        self.partial = files.root / f".upload-{digest}-{os.getpid()}-{id(self)}"
        self._handle = self.partial.open("wb")
        self._hash = hashlib.sha256()
        self.received = 0

    def write(self, offset: int, data: bytes) -> None:
        if offset != self.received:
            raise ValueError(f"chunk at offset {offset}, expected {self.received}")
        if self.received + len(data) > self.size:
            raise ValueError(f"upload exceeds its declared size of {self.size} bytes")
        self._handle.write(data)
        self._hash.update(data)
        self.received += len(data)

    def commit(self) -> None:
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        if self.received != self.size or self._hash.hexdigest() != self.digest:
            self.partial.unlink(missing_ok=True)
            raise ValueError("uploaded bytes do not match the declared digest and size")
        os.replace(self.partial, self.files.path(self.digest))

    def abort(self) -> None:
        if not self._handle.closed:
            self._handle.close()
        self.partial.unlink(missing_ok=True)
