"""Saved activations in one reused buffer, so the C heap only ever holds short-lived tensors.

A training step keeps its activations for backward (~175 MB on SmolLM2-135M's 2-6-2 emulator
at 8 × 128 tokens) while it allocates and frees several times that in temporaries (~740 MB in
forward, ~1.1 GB in backward). In glibc's heap the long-lived tensors sit between the
temporaries' holes, the holes rarely fit what comes next, and the process's resident memory
climbs far above what is live: measured ~360 MB above the step's start against ~175 MB of
activations. Trimming the heap after every step (``offsite.host.memory``) hands the pages back but
costs throughput: the next step faults them in again.

``ActivationArena.step()`` installs autograd's saved-tensor hooks for one forward and backward:
every saved tensor of at least ``MIN_BYTES`` that is not a parameter or buffer is copied into a
bump-allocated slice of one buffer, and the original is left to die with the temporaries. A
tensor that already lives in the buffer (one unpacked for backward and saved again by a graph
built there) stays where it is: copying it into the same buffer would change its storage while
autograd holds it, which autograd refuses. The
buffer is reused from the start at the next step (grown once if a step needed more), so its
pages are touched once and stay; the heap is left with temporaries only, whose holes do fit the
next ones. The copies are exact, so gradients are the same bits (tested); the cost is one copy
of the saved bytes per step.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

from offsite.host.memory import trim_allocator

MIN_BYTES = 64 * 1024  # smaller tensors stay where they are: the heap reuses small holes well
ALIGN = 64  # bytes; keeps every slice aligned for any dtype and for vector loads
# growth unit before a step's need is known: above glibc's largest mmap threshold (32 MiB), so
# chunks are mappings of their own and never holes in the heap
_CHUNK = 64 * 1024 * 1024


class ActivationArena:
    """One reusable buffer for the tensors autograd saves between forward and backward."""

    def __init__(self, keep_in_place: Iterable[torch.Tensor] = ()) -> None:
        self._protected = {t.untyped_storage().data_ptr() for t in keep_in_place}
        self._chunks: list[torch.Tensor] = []
        self._own: set[int] = set()  # storages of the chunks: what is already in the buffer
        self._chunk = 0
        self._offset = 0
        self._used = 0  # bytes taken this step, over all chunks
        self._copies: dict[int, tuple[weakref.ref[torch.Tensor], torch.Tensor]] = {}
        self.peak_bytes = 0  # largest step so far

    @property
    def capacity(self) -> int:
        return sum(int(c.numel()) for c in self._chunks)

    def _take(self, nbytes: int) -> torch.Tensor:
        size = -(-nbytes // ALIGN) * ALIGN
        while self._chunk < len(self._chunks):
            chunk = self._chunks[self._chunk]
            if self._offset + size <= chunk.numel():
                piece = chunk[self._offset : self._offset + nbytes]
                self._offset += size
                self._used += size
                return piece
            self._chunk, self._offset = self._chunk + 1, 0
        self._chunks.append(torch.empty(max(size, _CHUNK), dtype=torch.uint8))
        self._own.add(self._chunks[-1].untyped_storage().data_ptr())
        self._chunk, self._offset = len(self._chunks) - 1, 0
        return self._take(nbytes)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        nbytes = tensor.numel() * tensor.element_size()
        if (
            nbytes < MIN_BYTES
            or tensor.device.type != "cpu"
            or tensor.layout != torch.strided
            or not tensor.is_contiguous()  # views: copying would duplicate shared storage
            or tensor.untyped_storage().data_ptr() in self._protected
            or tensor.untyped_storage().data_ptr() in self._own
        ):
            return tensor
        key = tensor.data_ptr()
        seen = self._copies.get(key)
        if seen is not None and seen[0]() is tensor and seen[1].shape == tensor.shape:
            return seen[1]
        copy = self._take(nbytes).view(tensor.dtype).view(tensor.shape)
        copy.copy_(tensor)
        self._copies[key] = (weakref.ref(tensor), copy)
        return copy

    def _reset(self) -> None:
        """Start the next step at the buffer's beginning; one buffer of the largest need."""
        self.peak_bytes = max(self.peak_bytes, self._used)
        grown = len(self._chunks) > 1 or bool(self._chunks and self.peak_bytes > self.capacity)
        if grown:
            self._chunks = []  # freed before the single replacement is allocated
            self._chunks = [torch.empty(max(self.peak_bytes, _CHUNK), dtype=torch.uint8)]
            self._own = {self._chunks[0].untyped_storage().data_ptr()}
        self._chunk = self._offset = self._used = 0
        self._copies.clear()
        if grown:  # the step that sized the buffer left the heap at its old high-water mark
            gc.collect()
            trim_allocator()

    @contextmanager
    def step(self) -> Iterator[None]:
        """Route saved tensors of the forward and backward run inside into the buffer. The
        graph must be gone (backward done, or dropped) before the next ``step``."""
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack):
                yield
        finally:
            self._reset()


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor
