"""Memory sizes as people write them ('1.5GB', '800 MB', '2GiB'), one grammar for config and CLI."""

from __future__ import annotations

import re

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10}
_UNITS |= {"MIB": 2**20, "GIB": 2**30, "K": 2**10, "M": 2**20, "G": 2**30}


def parse_size(text: str) -> int:
    """'1.5GB' → bytes (decimal units; KiB/MiB/GiB and K/M/G binary)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(f"cannot read the size {text!r}; write e.g. 1.5GB, 800MB or 2GiB")
    return int(float(match.group(1)) * _UNITS[unit])
