"""Memory planner: which update policy, precision and checkpointing fit a data owner's budget.

For each candidate the planner loads the bundle's emulator prepared that way and predicts the
peak resident memory of training at the real batch size as

    runtime (this process before any model) + model (resident cost of the prepared emulator)
    + fixed training state (gradients, AdamW moments) + activations · examples per step,

where the last two terms are read off two short *probe* trainings at small batch sizes (peak RSS
over four steps at ``b1`` and ``b2`` examples, padded to the full length), extrapolated linearly
to the batch size. Probing small batches is safe where the real batch might not fit, and it
measures what an analytic count of weights and saved tensors misses: allocator workspace, the
dequantize blocks of the packed kernels, autocast copies, the loss head.

Every probe (and every measurement) runs in a fresh process, like the training process it
stands for: in one long-lived process, heap memory freed by one run is reused by the next and
hides part of its cost. Probing both batch sizes in one process made the second probe reuse
the first one's heap, so the per-example slope came out low and predictions fell up to 16 %
below the measured peak (SmolLM2-135M, 2-16-2, bias policy).

The first candidate in preference order that fits the budget is the pick. Preference: the
policy order given (by default lora, full, sparse, top, bias: most trained capacity first), the
precision this hardware computes fastest first (``preferred_precisions``: bf16 where the CPU or
GPU has bf16 units, where it is both faster and smaller; elsewhere fp32, and bf16 only after it,
for its smaller memory: on a CPU without bf16 units a bf16 probe of the default emulator took
156 s against 11 s in fp32), no checkpointing before checkpointing (recomputation costs time).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from client.profile import measure_training, peak_rss_bytes, reset_peak_rss, rss_bytes
from client.session import (
    COMPUTE_DTYPES,
    load_for_training,
    release_freed_memory,
    training_memory,
)
from emulator.adapter import AdaptedModel
from emulator.batches import Batch
from emulator.bundle import Bundle
from emulator.tokenizers import Tokenizer
from emulator.train import train_adapter
from offsite.policies import POLICIES

if TYPE_CHECKING:
    from offsite.host.allocator import Allocator

POLICY_PREFERENCE = ("lora", "full", "sparse", "top", "bias")
PROBE_SIZES = (2, 4)
# a probe trains as many steps as a measurement: the peak RSS is the worst of a few steps'
# heap layouts, and two steps missed it often enough to move a prediction by 10 %
PROBE_STEPS = 4
MEASURE_WARMUP = 1
# each size is probed this many times (a fresh process each) and the highest peak kept: the
# same probe's peak varies between processes by up to 50 MB (glibc's per-thread heaps), and the
# extrapolation to the batch size multiplies a low draw at the small size by (b - b1) / (b2 - b1)
PROBE_REPEATS = 2


@dataclass(frozen=True)
class Candidate:
    policy: str
    precision: str  # "fp32" | "bf16"
    checkpointing: bool = False

    @property
    def label(self) -> str:
        return f"{self.policy} {self.precision}" + (" +checkpointing" if self.checkpointing else "")


@dataclass
class Estimate:
    candidate: Candidate
    runtime: int  # bytes resident before any model
    model: int  # resident cost of the prepared emulator
    fixed: int  # training state independent of the batch (gradients, AdamW moments, ...)
    per_example: int  # activations and workspace per example of the batch
    batch_size: int
    probe_peaks: tuple[int, ...] = ()  # peak RSS above the loaded model per probe size
    measured_peak: int | None = None

    @property
    def predicted_peak(self) -> int:
        return self.runtime + self.model + self.fixed + self.per_example * self.batch_size

    @property
    def error(self) -> float | None:
        """(predicted - measured) / measured, once measured."""
        if self.measured_peak is None:
            return None
        return (self.predicted_peak - self.measured_peak) / self.measured_peak

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["candidate"] = self.candidate.label
        out["predicted_peak"] = self.predicted_peak
        out["error"] = self.error
        return out


def preferred_precisions() -> tuple[str, str]:
    """Both precisions, the one this machine computes fastest first (what ``auto`` resolves to:
    bf16 only where the hardware has bf16 units; without them bf16 is smaller but much slower)."""
    from emulator.forward import pick_device, resolve_precision

    fastest = resolve_precision("auto", pick_device())
    return ("bf16", "fp32") if fastest == "bf16" else ("fp32", "bf16")


def candidates(
    policies: Sequence[str] = POLICY_PREFERENCE,
    precisions: Sequence[str] | None = None,
    checkpointing: Sequence[bool] = (False, True),
) -> list[Candidate]:
    """Every combination, in preference order (see module docstring); ``precisions`` defaults
    to ``preferred_precisions()``."""
    if precisions is None:
        precisions = preferred_precisions()
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown update policies {unknown}; use some of {sorted(POLICIES)}")
    odd = [q for q in precisions if q not in COMPUTE_DTYPES]
    if odd:
        raise ValueError(f"unknown precisions {odd}; use some of {sorted(COMPUTE_DTYPES)}")
    return [Candidate(p, q, c) for p in policies for q in precisions for c in checkpointing]


def prepared_model(bundle: Bundle, candidate: Candidate) -> AdaptedModel:
    """The bundle's emulator with ``candidate``'s policy attached, ready to train."""
    adapted, _ = load_for_training(
        bundle,
        candidate.precision,
        policy=candidate.policy,
        checkpointing=candidate.checkpointing,
    )
    return adapted


def _fixed_length(batches: Iterator[Batch], max_length: int, pad_id: int) -> Iterator[Batch]:
    """Left-pad every batch to ``max_length`` (probes see the worst case of the real run)."""
    for batch in batches:
        missing = max_length - batch.input_ids.shape[1]
        if missing <= 0:
            yield batch
            continue
        rows = batch.input_ids.shape[0]
        yield Batch(
            input_ids=torch.cat((torch.full((rows, missing), pad_id), batch.input_ids), 1),
            attention_mask=torch.cat(
                (
                    torch.zeros(rows, missing, dtype=batch.attention_mask.dtype),
                    batch.attention_mask,
                ),
                1,
            ),
            labels=torch.cat((torch.full((rows, missing), -100), batch.labels), 1),
            answer_span=batch.answer_span,
        )


@dataclass
class Probe:
    """One short training at ``size`` examples per step, in its own process."""

    runtime: int  # bytes resident before any model
    model: int  # resident cost of the prepared emulator
    size: int
    peak: int  # peak RSS above the loaded model over the probe's steps


def probe(
    bundle: Bundle,
    candidate: Candidate,
    batches: Iterator[Batch],
    *,
    size: int,
    runtime: int,
    device: torch.device | None = None,
) -> Probe:
    """Load ``candidate`` and train it ``PROBE_STEPS`` steps on ``batches`` of ``size`` examples."""
    device = device or torch.device("cpu")
    release_freed_memory()
    start = rss_bytes()
    runtime = max(runtime, start)  # libraries, tokenizer and data are resident by now
    adapted = prepared_model(bundle, candidate)  # trims freed memory itself
    model_cost = max(0, rss_bytes() - start)
    release_freed_memory()
    before = rss_bytes()
    reset_peak_rss()
    train_adapter(
        adapted,
        batches,
        steps=PROBE_STEPS,
        lr=POLICIES[candidate.policy].lr,
        precision=candidate.precision,
        device=device,
        **training_memory(adapted, candidate.checkpointing, device),  # as the node trains
    )
    return Probe(runtime, model_cost, size, peak_rss_bytes() - before)


def fit(candidate: Candidate, probes: Sequence[Probe], batch_size: int) -> Estimate:
    """The line through the highest peak at each of two probe sizes: a fixed cost plus a
    cost per example."""
    highest: dict[int, Probe] = {}
    for item in probes:
        if item.size not in highest or item.peak > highest[item.size].peak:
            highest[item.size] = item
    if len(highest) != 2:
        sizes = sorted(highest)
        raise ValueError(f"probes need exactly two batch sizes to fit a line, got {sizes}")
    small, large = (highest[size] for size in sorted(highest))
    per_example = max(0, (large.peak - small.peak) // (large.size - small.size))
    fixed = max(0, small.peak - per_example * small.size)
    return Estimate(
        candidate,
        max(p.runtime for p in probes),
        sum(p.model for p in probes) // len(probes),
        fixed,
        per_example,
        batch_size,
        (small.peak, large.peak),
    )


def measure(
    bundle: Bundle,
    candidate: Candidate,
    batches: Iterator[Batch],
    *,
    steps: int = PROBE_STEPS - MEASURE_WARMUP,
    device: torch.device | None = None,
) -> int:
    """Train ``candidate`` on ``batches`` (the real batch size) and return the peak RSS."""
    device = device or torch.device("cpu")
    release_freed_memory()
    adapted = prepared_model(bundle, candidate)
    result = measure_training(
        adapted,
        batches,
        steps=steps,
        warmup=MEASURE_WARMUP,
        lr=POLICIES[candidate.policy].lr,
        precision=candidate.precision,
        device=device,
        **training_memory(adapted, candidate.checkpointing, device),
    )
    del adapted
    release_freed_memory()
    return result.peak_rss


def pick(estimates: Sequence[Estimate], budget: int) -> Estimate | None:
    """The first estimate (preference order) whose predicted peak fits ``budget`` bytes."""
    return next((e for e in estimates if e.predicted_peak <= budget), None)


@dataclass(frozen=True)
class Workload:
    """What the planned training looks like: the bundle, local data and the batch shape."""

    bundle: str
    data: str
    batch_size: int = 8
    max_length: int = 128
    max_words: int = 90
    template: str = ""  # empty: the data set's own, else "{text}" style default of the config
    # C allocator of the probe processes (``offsite.host.allocator``): "inherit" takes this
    # process's own (a node's ClientApp runs on what its SuperNode was started with)
    allocator: Allocator | Literal["inherit"] = "inherit"

    def make_batches(self, tokenizer: Tokenizer) -> Callable[[int], Iterator[Batch]]:
        from emulator.examples import training_batches
        from offsite.config import DataConfig
        from offsite.data import load_task

        task = load_task(self.data, min_labels=1)
        template = self.template or task.template or DataConfig().template

        def make(size: int) -> Iterator[Batch]:
            return training_batches(
                tokenizer,
                task.examples,
                template,
                max_words=self.max_words,
                max_length=self.max_length,
                batch_size=size,
                seed=0,
            )

        return make


def _run_here(action: str, workload: Workload, candidate: Candidate, size: int) -> dict[str, Any]:
    """``probe`` at ``size`` examples per step, or ``measure`` at the real batch size, here."""
    from client.session import load_client_tokenizer
    from emulator.batches import pad_id
    from emulator.bundle import verify_bundle

    bundle = verify_bundle(workload.bundle)
    tokenizer = load_client_tokenizer(bundle)
    make_batches = workload.make_batches(tokenizer)
    next(make_batches(1))  # the data set is loaded and tokenized
    runtime = rss_bytes()
    if action == "measure":
        return {"measured_peak": measure(bundle, candidate, make_batches(workload.batch_size))}
    batches = _fixed_length(make_batches(size), workload.max_length, pad_id(tokenizer))
    return asdict(probe(bundle, candidate, batches, size=size, runtime=runtime))


def _in_subprocess(
    action: str, workload: Workload, candidate: Candidate, size: int = 0
) -> dict[str, Any]:
    payload = json.dumps(
        {"workload": asdict(workload), "candidate": asdict(candidate), "size": size}
    )
    from offsite.host.allocator import allocator_env

    env = dict(os.environ)
    if workload.allocator != "inherit":
        env = allocator_env(env, workload.allocator)
    done = subprocess.run(
        [sys.executable, "-m", "client.planner", action, payload],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{action} of {candidate.label} failed:\n{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])  # the child's JSON
    return result


def estimate(workload: Workload, candidate: Candidate) -> Estimate:
    """Probe ``candidate`` ``PROBE_REPEATS`` times at each of ``PROBE_SIZES`` (a fresh process
    each) and fit."""
    probes = [
        Probe(**_in_subprocess("probe", workload, candidate, size))
        for size in PROBE_SIZES
        for _ in range(PROBE_REPEATS)
    ]
    return fit(candidate, probes, workload.batch_size)


def measure_in_subprocess(workload: Workload, candidate: Candidate) -> int:
    """Peak RSS of training ``candidate`` at the real batch size, in a fresh process."""
    return int(_in_subprocess("measure", workload, candidate)["measured_peak"])


def plan(
    workload: Workload,
    options: Sequence[Candidate],
    budget: int,
    *,
    measure_pick: bool = True,
    measure_all: bool = False,
    stop_at_first_fit: bool = False,
    progress: Callable[[], object] | None = None,
) -> tuple[list[Estimate], Estimate | None]:
    """Probe the options in order, pick the first that fits ``budget``, measure as asked.

    ``stop_at_first_fit`` leaves the options after the pick unprobed (a node deciding before
    training needs only the pick; a planning report shows them all).
    """
    estimates = []
    for candidate in options:
        estimates.append(estimate(workload, candidate))
        if progress is not None:
            progress()
        if stop_at_first_fit and estimates[-1].predicted_peak <= budget:
            break
    chosen = pick(estimates, budget)
    targets = estimates if measure_all else ([chosen] if measure_pick and chosen else [])
    for item in targets:
        item.measured_peak = measure_in_subprocess(workload, item.candidate)
    return estimates, chosen


def _main(argv: Sequence[str]) -> None:
    import logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    action, payload = argv
    data = json.loads(payload)
    workload = Workload(**data["workload"])
    print(json.dumps(_run_here(action, workload, Candidate(**data["candidate"]), data["size"])))


if __name__ == "__main__":
    _main(sys.argv[1:])
