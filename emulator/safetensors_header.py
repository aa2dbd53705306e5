"""Read a safetensors header without touching tensor data, with hard size limits.

Used to check names, dtypes and shapes against a manifest *before* anything is materialised, and
to reject truncated files or out-of-bounds offsets with a clear error rather than a crash.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO

from offsite.errors import IntegrityError

MAX_HEADER_BYTES = 16 * 1024 * 1024


def read_header(path: Path, handle: BinaryIO | None = None) -> dict[str, dict[str, Any]]:
    """Tensor name -> {dtype, shape, data_offsets}; raises IntegrityError on any inconsistency.
    ``handle``: the file already open (read from it, so it is the file that was checked)."""
    if handle is None:
        with path.open("rb") as opened:
            return read_header(path, opened)
    size = os.fstat(handle.fileno()).st_size
    handle.seek(0)
    prefix = handle.read(8)
    if len(prefix) < 8:
        raise IntegrityError(f"{path.name} is truncated (no safetensors header)")
    (length,) = struct.unpack("<Q", prefix)
    if length > MAX_HEADER_BYTES or length + 8 > size:
        raise IntegrityError(
            f"{path.name} declares a {length}-byte header (file is {size} bytes, cap "
            f"{MAX_HEADER_BYTES}); the file is corrupt or not safetensors"
        )
    raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise IntegrityError(f"{path.name} has an unreadable safetensors header") from err
    if not isinstance(header, dict):
        raise IntegrityError(f"{path.name} header is not a JSON object")
    header.pop("__metadata__", None)
    data_size = size - 8 - length
    spans = []
    for name, entry in header.items():
        try:
            start, end = (int(x) for x in entry["data_offsets"])
            entry["shape"] = [int(d) for d in entry["shape"]]
            str(entry["dtype"])
        except (KeyError, TypeError, ValueError) as err:
            raise IntegrityError(f"{path.name}: tensor {name!r} has a malformed entry") from err
        if not 0 <= start <= end <= data_size:
            raise IntegrityError(f"{path.name}: tensor {name!r} points outside the file")
        spans.append((start, end, name))
    spans.sort()
    for (_, end_a, a), (start_b, _, b) in itertools.pairwise(spans):
        if start_b < end_a:
            raise IntegrityError(f"{path.name}: tensors {a!r} and {b!r} overlap")
    return header
