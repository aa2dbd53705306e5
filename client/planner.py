"""Memory planner: which update policy, precision and checkpointing fit a data owner's budget.

For each candidate the planner loads the bundle's emulator prepared that way and predicts the
peak resident memory of training at the real batch size as

    runtime (this process before any model) + model (resident cost of the prepared emulator)
    + fixed training state (gradients, AdamW moments) + activations · examples per step,

where the last two terms are read off two short *probe* trainings at small batch sizes (peak RSS
over two steps at ``b1`` and ``b2`` examples, padded to the full length), extrapolated linearly
to the batch size. Probing small batches is safe where the real batch might not fit, and it
measures what an analytic count of weights and saved tensors misses: allocator workspace, the
dequantize blocks of the packed kernels, autocast copies, the loss head.

Every candidate is probed (and measured) in a fresh process, like the training process it
stands for: in one long-lived process, memory freed by one candidate is reused by the next and
hides part of its cost.

The first candidate in preference order that fits the budget is the pick. Preference: the
policy order given (by default lora, full, sparse, top, bias: most trained capacity first), bf16
before fp32 (faster and smaller where the CPU has bf16), no checkpointing before checkpointing
(recomputation costs time).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from client.profile import measure_training, peak_rss_bytes, reset_peak_rss, rss_bytes
from client.session import load_for_training, release_freed_memory
from emulator.adapter import POLICIES, AdaptedModel
from emulator.batches import Batch
from emulator.bundle import Bundle
from emulator.train import train_adapter
from offsite.config import POLICY_LR

POLICY_PREFERENCE = ("lora", "full", "sparse", "top", "bias")
PROBE_SIZES = (2, 4)


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


def candidates(
    policies: Sequence[str] = POLICY_PREFERENCE,
    precisions: Sequence[str] = ("bf16", "fp32"),
    checkpointing: Sequence[bool] = (False, True),
) -> list[Candidate]:
    """Every combination, in preference order (see module docstring)."""
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown update policies {unknown}; use some of {sorted(POLICIES)}")
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


def _probe(
    adapted: AdaptedModel, batches: Iterator[Batch], candidate: Candidate, device: torch.device
) -> int:
    """Peak RSS above the current RSS over two training steps."""
    release_freed_memory()
    before = rss_bytes()
    reset_peak_rss()
    train_adapter(
        adapted,
        batches,
        steps=2,
        lr=POLICY_LR[candidate.policy],
        precision=candidate.precision,
        device=device,
        trim_memory=True,  # what a node under a budget does (client.budget)
    )
    return peak_rss_bytes() - before


def estimate(
    bundle: Bundle,
    candidate: Candidate,
    make_batches: Any,
    *,
    batch_size: int,
    max_length: int,
    pad_id: int,
    runtime: int,
    device: torch.device | None = None,
) -> Estimate:
    """Probe ``candidate`` and extrapolate its peak to ``batch_size`` examples per step.

    ``make_batches(size)`` returns an iterator of training batches of ``size`` examples.
    """
    device = device or torch.device("cpu")
    release_freed_memory()
    start = rss_bytes()
    runtime = max(runtime, start)  # libraries, tokenizer and data are resident by now
    adapted = prepared_model(bundle, candidate)  # trims freed memory itself
    model_cost = max(0, rss_bytes() - start)
    b1, b2 = PROBE_SIZES
    peaks = tuple(
        _probe(adapted, _fixed_length(make_batches(b), max_length, pad_id), candidate, device)
        for b in (b1, b2)
    )
    per_example = max(0, (peaks[1] - peaks[0]) // (b2 - b1))
    fixed = max(0, peaks[0] - per_example * b1)
    del adapted
    release_freed_memory()
    return Estimate(candidate, runtime, model_cost, fixed, per_example, batch_size, peaks)


def measure(
    bundle: Bundle,
    chosen: Estimate,
    make_batches: Any,
    *,
    steps: int = 3,
    device: torch.device | None = None,
) -> Estimate:
    """Train ``chosen`` at its real batch size and record the measured peak RSS."""
    device = device or torch.device("cpu")
    release_freed_memory()
    adapted = prepared_model(bundle, chosen.candidate)
    result = measure_training(
        adapted,
        make_batches(chosen.batch_size),
        steps=steps,
        warmup=1,
        lr=POLICY_LR[chosen.candidate.policy],
        precision=chosen.candidate.precision,
        device=device,
        trim_memory=True,
    )
    chosen.measured_peak = result.peak_rss
    del adapted
    release_freed_memory()
    return chosen


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

    def make_batches(self, tokenizer: Any) -> Any:
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


def _run_here(action: str, workload: Workload, candidate: Candidate) -> Estimate:
    """Probe (and for ``measure`` also train) one candidate in this process."""
    import peft  # noqa: F401  (resident in any training process; counted in the runtime)

    from emulator.batches import pad_id
    from emulator.bundle import load_bundle_tokenizer, verify_bundle

    bundle = verify_bundle(workload.bundle)
    tokenizer = load_bundle_tokenizer(bundle)
    make_batches = workload.make_batches(tokenizer)
    next(make_batches(1))  # the data set is loaded and tokenized
    runtime = rss_bytes()
    if action == "measure":
        result = Estimate(candidate, runtime, 0, 0, 0, workload.batch_size)
        return measure(bundle, result, make_batches)
    return estimate(
        bundle,
        candidate,
        make_batches,
        batch_size=workload.batch_size,
        max_length=workload.max_length,
        pad_id=pad_id(tokenizer),
        runtime=runtime,
    )


def run_in_subprocess(action: str, workload: Workload, candidate: Candidate) -> Estimate:
    """``probe`` or ``measure`` one candidate in a fresh Python process."""
    payload = json.dumps({"workload": asdict(workload), "candidate": asdict(candidate)})
    done = subprocess.run(
        [sys.executable, "-m", "client.planner", action, payload],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{action} of {candidate.label} failed:\n{done.stderr[-2000:]}")
    data = json.loads(done.stdout.strip().splitlines()[-1])
    return Estimate(
        candidate,
        data["runtime"],
        data["model"],
        data["fixed"],
        data["per_example"],
        data["batch_size"],
        tuple(data["probe_peaks"]),
        data["measured_peak"],
    )


def plan(
    workload: Workload,
    options: Sequence[Candidate],
    budget: int,
    *,
    measure_pick: bool = True,
    measure_all: bool = False,
    progress: Any = None,
) -> tuple[list[Estimate], Estimate | None]:
    """Probe every option, pick the first that fits ``budget``, measure as asked."""
    estimates = []
    for candidate in options:
        estimates.append(run_in_subprocess("probe", workload, candidate))
        if progress is not None:
            progress()
    chosen = pick(estimates, budget)
    targets = estimates if measure_all else ([chosen] if measure_pick and chosen else [])
    for item in targets:
        item.measured_peak = run_in_subprocess("measure", workload, item.candidate).measured_peak
    return estimates, chosen


def _main(argv: Sequence[str]) -> None:
    import logging
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    action, payload = argv
    data = json.loads(payload)
    workload = Workload(**data["workload"])
    result = _run_here(action, workload, Candidate(**data["candidate"]))
    print(json.dumps(asdict(result) | {"candidate": None}))


if __name__ == "__main__":
    _main(sys.argv[1:])
