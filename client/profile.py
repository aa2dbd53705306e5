"""Measure a training configuration: tokens per second and peak resident memory.

Peak memory is the kernel's own high-water mark of this process (``VmHWM``), reset just before
the measured steps (``/proc/self/clear_refs``, Linux ≥ 4.0), so it covers the training steps and
not a transient of loading. Everything resident counts: the interpreter and libraries, weights,
activations, gradients and optimizer state — what a data owner's machine must actually have.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from emulator.adapter import AdaptedModel
from emulator.batches import Batch
from emulator.train import train_adapter

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(field_name: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field_name} is not in {_STATUS}")


def rss_bytes() -> int:
    """Resident memory of this process now."""
    return _status_bytes("VmRSS")


def anonymous_rss_bytes() -> int:
    """Resident memory of this process now that is its own (``RssAnon``): without the page
    cache of memory-mapped files, which processes on one machine share."""
    return _status_bytes("RssAnon")


def reset_peak_rss() -> bool:
    """Start a new high-water mark at the current RSS; False where the kernel cannot."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    """Highest resident memory since the last ``reset_peak_rss`` (or process start)."""
    return _status_bytes("VmHWM")


@dataclass
class Measurement:
    tokens_per_second: float
    step_seconds: list[float] = field(default_factory=list)  # measured steps only
    tokens_per_step: float = 0.0
    peak_rss: int = 0  # bytes, over the measured steps (warm-up included: it allocates)
    rss_before: int = 0  # bytes resident when training started
    losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_training(
    adapted: AdaptedModel,
    batches: Iterator[Batch],
    *,
    steps: int,
    warmup: int,
    lr: float,
    precision: str,
    device: torch.device,
    trim_memory: bool = False,
    saved_tensors: Callable[[], AbstractContextManager[None]] | None = None,
) -> Measurement:
    """Train ``warmup + steps`` steps with the client recipe; time only the last ``steps``."""
    gc.collect()
    rss_before = rss_bytes()
    reset_peak_rss()
    stamps: list[float] = []
    tokens: list[int] = []
    fed: list[Batch] = []

    def counted() -> Iterator[Batch]:
        for batch in batches:
            fed.append(batch)
            yield batch

    def on_step(_step: int, _loss: float) -> None:
        stamps.append(time.perf_counter())
        tokens.append(int(fed[-1].attention_mask.sum()))

    start = time.perf_counter()
    result = train_adapter(
        adapted,
        counted(),
        steps=warmup + steps,
        lr=lr,
        precision=precision,
        device=device,
        on_step=on_step,
        trim_memory=trim_memory,
        saved_tensors=saved_tensors,
    )
    times = [b - a for a, b in zip([start, *stamps[:-1]], stamps, strict=True)][warmup:]
    measured_tokens = sum(tokens[warmup:])
    return Measurement(
        tokens_per_second=measured_tokens / sum(times),
        step_seconds=times,
        tokens_per_step=measured_tokens / len(times),
        peak_rss=peak_rss_bytes(),
        rss_before=rss_before,
        losses=result.losses,
    )
