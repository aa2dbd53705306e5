"""Small file helpers shared by coordinator and client."""

from __future__ import annotations

import os
from pathlib import Path


def write_private(path: Path, data: bytes) -> None:
    """Write a secret file readable by its owner only (0600), atomically and durably."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically: a crash leaves the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


MIN_TOKEN = 16  # characters of a bearer token (secrets.token_urlsafe(32) gives 43)


def read_token(path: Path, what: str) -> str:
    """A bearer token kept in a file (never in argv, which every local user can list), at least
    ``MIN_TOKEN`` characters; ``what`` names it in the errors (ValueError)."""
    try:
        value = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read {what} {path}: {err}") from err
    return check_token(value, f"{what} {path}")


def check_token(value: str, where: str) -> str:
    """``value`` if it is long enough for a bearer token (``MIN_TOKEN`` characters); a
    ValueError naming ``where`` it came from otherwise."""
    if len(value) < MIN_TOKEN:
        raise ValueError(
            f"{where} holds {len(value)} characters; use a token of at least {MIN_TOKEN} "
            "characters (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
        )
    return value
