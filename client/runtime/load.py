"""Load a verified bundle's emulator onto the lean decoder (fp32 or owner-quantized)."""

from __future__ import annotations

import json
import math
import mmap
import struct
from pathlib import Path
from typing import BinaryIO

import torch

from client.runtime.decoder import LeanCausalLM, LeanConfig, lean_config
from emulator.bundle import Bundle, fill_bundle_model
from emulator.safetensors_header import read_header
from offsite.errors import IntegrityError

DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I32": torch.int32,
    "I64": torch.int64,
}


def mapped_tensors(path: Path, handle: BinaryIO | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as copy-on-write views of its memory map.

    Nothing is read until used, and the pages are the file's, not the process heap's: the client
    converts and copies what it keeps (``client.session.prepare_frozen``), and the mapping goes
    with the last view. Reading the file into memory instead left ~70 MB of freed fp32 weights
    resident on SmolLM2-135M's 2-6-2 emulator (heap pages glibc keeps). ``handle``: the file
    already open (header and map then come from that very file).
    """
    if handle is None:
        with path.open("rb") as opened:
            return mapped_tensors(path, opened)
    header = read_header(path, handle)
    handle.seek(0)
    (length,) = struct.unpack("<Q", handle.read(8))
    mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    base = 8 + length
    tensors = {}
    for name, entry in header.items():
        dtype = DTYPES.get(entry["dtype"])
        if dtype is None:
            raise IntegrityError(f"{path.name}: tensor {name!r} has unsupported dtype")
        start, end = entry["data_offsets"]
        count = math.prod(entry["shape"])
        if count * dtype.itemsize != end - start:
            raise IntegrityError(f"{path.name}: tensor {name!r} has a shape its bytes do not fit")
        if count == 0:  # frombuffer refuses an empty view
            tensors[name] = torch.empty(entry["shape"], dtype=dtype)
            continue
        flat = torch.frombuffer(mapped, dtype=dtype, count=count, offset=base + start)
        tensors[name] = flat.view(entry["shape"])
    return tensors


def bundle_lean_config(bundle: Bundle) -> tuple[LeanConfig | None, str]:
    """The lean decoder's config for ``bundle``, or (None, why it cannot run there)."""
    return lean_config(json.loads((bundle.path / "config.json").read_text()))


def load_lean_model(bundle: Bundle, config: LeanConfig) -> LeanCausalLM:
    """The emulator of a *verified* bundle on ``LeanCausalLM``: built without initialising
    weights, quantized linears shaped from the manifest, every tensor taken from the bundle's
    files; a tensor that finds no place, or a place left without a tensor, is an error."""
    with torch.device("meta"):
        model = LeanCausalLM(config)
    fill_bundle_model(model, bundle, mapped_tensors, assign=True)
    return model
