"""One copy per host of a session's frozen tensors, shared by every worker process.

Each simulation worker (a Ray actor, one per ``federation.client_cpus`` slot) loads the bundle
and prepares its frozen part the same way (``client.session.prepare_frozen``: int8 kernels
repacked, bf16 copies), so before this every worker held its own identical copy in process
memory. Here the first worker writes its prepared frozen tensors to a host cache file
(``$OFFSITE_FROZEN`` or ``$OFFSITE_HOME/frozen``, one ``<key>.safetensors`` per preparation and
host; ``OFFSITE_FROZEN=off`` turns sharing off), and every worker (that one included) swaps its
own copies for copy-on-write views of that file's memory map: the pages are the page cache's,
resident once per host whatever the number of workers, and the worker's own copy is freed.
Measured on the default SmolLM2-135M bundle (one process, 2026-12-07): a worker's anonymous
memory falls by 100 MB in bf16 (264 → 164 MB after loading) and by 195 MB in fp32 (359 → 165
MB); larger models save in proportion.

Workers that load at the same moment take turns on one lock (``.lock`` in the folder, held
while a worker checks, writes and maps), so the first writes the file and the others map that
same file. Trust: a worker opens the file without following links, requires it to be a regular
file of its own with no group or other permissions and one link, and compares it with its own
freshly prepared tensors byte for byte before it swaps anything in, so a stale, torn or foreign
file is never trained on (it is written again). A file is replaced atomically and never written
in place, so a mapped file does not change under a worker. A round that replaces frozen weights
(merge-exact's LoRA base weights) writes into its private copy of the touched pages, never into
the file. Any failure only costs the sharing: it is logged, never raised.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import stat
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn

from client.runtime.load import DTYPES, mapped_tensors
from offsite.errors import IntegrityError
from offsite.host.paths import frozen_folder, private_folder

log = logging.getLogger(__name__)

MIN_BYTES = 64 * 1024  # smaller tensors (norms, biases) are not worth a view of their own
MAX_FILES = 4  # least recently used files beyond this are removed
SHAREABLE = frozenset(DTYPES.values())  # what ``mapped_tensors`` reads back
# every tensor of the file starts at this alignment (``_write``): safetensors' own writer aligns
# offsets to the dtype alone, and torch's int8 kernel (aten._weight_int8pack_mm) crashed
# (SIGSEGV) on codes 1, 2 or 8 bytes off a 64-byte boundary in a test here. A file with a tensor
# mapped off that alignment is never used (``_mapped_if_equal``): it is written again.
ALIGNMENT = 64
_PAD = "__pad"  # padding entries (uint8) between tensors: the format allows no holes
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# what can go wrong reading, writing or mapping the file; each only costs the sharing
_FAILURES = (OSError, IntegrityError, RuntimeError, ValueError)


def _frozen_tensors(
    model: nn.Module, adapter: frozenset[str], min_bytes: int
) -> dict[str, list[torch.Tensor]]:
    """The model's frozen tensors worth sharing (frozen parameters that are not the adapter's,
    and buffers), by the name of their first holder. Only tensors that are the whole of their
    storage are shared (a view of part of another tensor would be split from it by the swap);
    holders of one storage (a tied head and its embedding) are one entry and stay one."""
    found: dict[str, list[torch.Tensor]] = {}
    storages: dict[int, str] = {}
    named = [
        *((n, p) for n, p in model.named_parameters() if not p.requires_grad and n not in adapter),
        *model.named_buffers(),
    ]
    for name, tensor in named:
        size = tensor.numel() * tensor.element_size()
        if tensor.device.type != "cpu" or tensor.dtype not in SHAREABLE or not size:
            continue
        storage = tensor.untyped_storage()
        whole = tensor.storage_offset() == 0 and storage.nbytes() == size
        if not whole or not tensor.is_contiguous() or size < min_bytes:
            continue
        if storage.data_ptr() in storages:
            found[storages[storage.data_ptr()]].append(tensor)
            continue
        storages[storage.data_ptr()] = name
        found[name] = [tensor]
    return found


def _key(label: str, tensors: dict[str, torch.Tensor]) -> str:
    """File name for ``label`` on this host (a folder shared over the network holds one file
    per host) and this exact tensor layout."""
    digest = hashlib.sha256(f"{label}|{socket.gethostname()}".encode())
    for name, tensor in sorted(tensors.items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
    return digest.hexdigest()[:32]


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def _open_own(path: Path) -> BinaryIO | None:
    """``path`` opened for reading if it is a regular file of this user's, private, with one
    link, never through a symbolic link; None otherwise."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:  # absent, or a link
        return None
    handle = os.fdopen(descriptor, "rb")
    found = os.fstat(descriptor)
    private = stat.S_ISREG(found.st_mode) and found.st_uid == os.getuid()
    if not private or found.st_mode & 0o077 or found.st_nlink != 1:
        handle.close()
        return None
    return handle


def _mapped_if_equal(path: Path, own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The tensors of ``path`` as views of its memory map if they are ``own``'s byte for byte,
    each ``ALIGNMENT``-aligned; None for a missing, foreign, unreadable, unaligned or different
    file."""
    handle = _open_own(path)
    if handle is None:
        return None
    with handle:
        try:
            found = mapped_tensors(path, handle)
        except IntegrityError:  # not a safetensors file we could have written
            return None
    mapped = {name: t for name, t in found.items() if not name.startswith(_PAD)}
    same = mapped.keys() == own.keys() and all(
        mapped[n].data_ptr() % ALIGNMENT == 0
        and mapped[n].dtype == t.dtype
        and mapped[n].shape == t.shape
        and torch.equal(_bytes(mapped[n]), _bytes(t))
        for n, t in own.items()
    )
    return mapped if same else None


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` to ``path`` atomically (read-only for the owner) as a safetensors file
    whose every tensor starts ``ALIGNMENT``-aligned in the file (and so in its memory map):
    padding entries fill the gaps and spaces pad the header, both allowed by the format.
    Written here rather than by ``safetensors.torch.save_file`` for that alignment alone."""
    header: dict[str, dict[str, object]] = {}
    layout: list[tuple[int, str]] = []  # (padding before it, name), in file order
    offset = 0
    for index, name in enumerate(sorted(tensors)):
        tensor = tensors[name]
        gap = (-offset) % ALIGNMENT
        if gap:
            header[f"{_PAD}{index}"] = {
                "dtype": "U8",
                "shape": [gap],
                "data_offsets": [offset, offset + gap],
            }
            offset += gap
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        layout.append((gap, name))
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-(8 + len(raw))) % ALIGNMENT)  # the data then starts aligned too
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".frozen-")
    try:
        with os.fdopen(handle, "wb") as out:  # tensor by tensor: no second copy in memory
            out.write(struct.pack("<Q", len(raw)) + raw)
            for gap, name in layout:
                out.write(bytes(gap))
                out.write(_bytes(tensors[name]).numpy().data)
        os.chmod(temporary, 0o400)
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def _evict(root: Path) -> None:
    """Drop the least recently used files beyond ``MAX_FILES`` and the temporary files of
    writers that died (called under the lock, when no writer is at work)."""
    for stale in root.glob(".frozen-*"):
        stale.unlink(missing_ok=True)
    dated = []
    for path in root.glob("*.safetensors"):
        with contextlib.suppress(FileNotFoundError):
            dated.append((path.stat().st_mtime, path))
    for _, stale in sorted(dated, reverse=True)[MAX_FILES:]:
        stale.unlink(missing_ok=True)  # a worker still mapping it keeps its pages


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """The folder's lock, held by one worker at a time (released if the worker dies)."""
    descriptor = os.open(root / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def share_frozen(
    model: nn.Module,
    label: str,
    adapter: frozenset[str] = frozenset(),
    *,
    min_bytes: int = MIN_BYTES,
) -> int:
    """Swap ``model``'s frozen tensors (parameters not named in ``adapter``, and buffers) for
    views of the host's shared copy, writing that copy first if there is none that equals
    them; returns the bytes now shared (0: nothing was swapped). ``label`` names the bundle and
    how it was prepared (digest, precision, …): workers with the same label share a file."""
    groups = _frozen_tensors(model, adapter, min_bytes)
    root = frozen_folder()
    if not groups or root is None:
        return 0
    if not private_folder(root, "frozen-tensor cache", "$OFFSITE_FROZEN"):
        return 0
    own = {name: holders[0] for name, holders in groups.items()}
    path = root / f"{_key(label, own)}.safetensors"
    try:
        with _locked(root):
            mapped = _mapped_if_equal(path, own)
            if mapped is None:
                _evict(root)
                _write(path, own)
                mapped = _mapped_if_equal(path, own)
                if mapped is None:
                    log.warning("shared frozen tensors %s do not read back: not shared", path)
                    return 0
            os.utime(path)  # recently used
    except _FAILURES as err:  # a full disk, say: only the sharing is lost
        log.warning("could not share the frozen tensors through %s (%s)", root, err)
        return 0
    with torch.no_grad():
        for name, holders in groups.items():
            for tensor in holders:
                tensor.data = mapped[name]
    return sum(t.numel() * t.element_size() for t in own.values())
