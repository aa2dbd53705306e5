"""SHA-256 digests as names: the one check every digest passes before it becomes a path."""

from __future__ import annotations

import re

from offsite.errors import IntegrityError

SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def is_sha256(text: object) -> bool:
    """Whether ``text`` is a sha256 digest written as 64 lowercase hex characters."""
    return isinstance(text, str) and SHA256_HEX.fullmatch(text) is not None


def require_sha256(text: object, what: str = "digest") -> str:
    """``text`` if it is a sha256 digest, else IntegrityError naming ``what`` (a digest from a
    peer or a command line never becomes a path unchecked: ``../x`` would escape the cache)."""
    if not is_sha256(text):
        shown = repr(text)[:80]
        raise IntegrityError(f"{what} {shown} is not a sha256 digest (64 lowercase hex characters)")
    return str(text)
