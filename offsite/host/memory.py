"""Give memory the C allocator holds but no longer uses back to the OS.

glibc keeps freed heap memory for reuse, and a training step's activations (many tensors of
1–5 MB, freed in a different order than allocated) leave it fragmented: the next step's
tensors do not fit the holes, the heap grows, and the process keeps a high-water mark well
above what it uses. Trimming after every optimizer step returns the free pages, so each step
starts from what is live, at the price of faulting them in again: a lower peak for fewer
tokens/s (the trimmed full fine-tuning rows of bf16 in bench/reports/client.md). Hence opt-in
(``train_adapter``'s ``trim_memory``). Clients no longer use it: ``client.kernels.arena`` keeps
their activations out of the heap at a lower cost.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache


@lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        library = ctypes.CDLL(name or "libc.so.6")
    except OSError:
        return None
    return library if hasattr(library, "malloc_trim") else None  # musl, macOS: nothing to do


def trim_allocator() -> bool:
    """Release the C heap's free pages to the OS (glibc ``malloc_trim``); False elsewhere."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
