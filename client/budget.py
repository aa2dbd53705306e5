"""Fit a node's training to its memory budget before the first round trains.

The bundle fixes the update policy (every client must train the same tensors); what a node can
still choose is activation checkpointing. With a budget, the node asks the planner (probes in
fresh processes) whether training fits as is, else — probed only then — with checkpointing,
and refuses to train — with the numbers — when neither does. The decision is kept per bundle and
budget (in a JSON file when the node has a folder), so it is made once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from client import planner
from client.planner import Candidate, Workload
from offsite.host.sizes import parse_size


class BudgetError(RuntimeError):
    """Training cannot fit this node's memory budget."""


@dataclass(frozen=True)
class Fit:
    checkpointing: bool
    predicted_peak: int  # bytes


_DECISIONS: dict[str, Fit] = {}


def fit_budget(
    workload: Workload,
    policy: str,
    precision: str,
    budget_text: str,
    digest: str,
    cache_dir: Path | None = None,
) -> Fit:
    """Whether to checkpoint so that training ``workload`` stays under ``budget_text``."""
    budget = parse_size(budget_text)
    key = f"{digest[:16]}-{policy}-{precision}-{workload.batch_size}x{workload.max_length}-{budget}"
    if key in _DECISIONS:
        return _DECISIONS[key]
    path = cache_dir / f"plan-{key}.json" if cache_dir is not None else None
    if path is not None and path.is_file():
        saved = json.loads(path.read_text())
        fit = Fit(bool(saved["checkpointing"]), int(saved["predicted_peak"]))
    else:
        options = [Candidate(policy, precision, False), Candidate(policy, precision, True)]
        estimates, chosen = planner.plan(
            workload, options, budget, measure_pick=False, stop_at_first_fit=True
        )
        if chosen is None:
            smallest = min(e.predicted_peak for e in estimates)
            raise BudgetError(
                f"training the {policy!r} policy in {precision} needs about "
                f"{smallest / 2**20:.0f} MiB even with activation checkpointing, over this "
                f"node's memory budget of {budget_text}; raise the budget or ask the "
                "coordinator for a smaller batch or another update policy"
            )
        fit = Fit(chosen.candidate.checkpointing, chosen.predicted_peak)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(fit.__dict__))
    _DECISIONS[key] = fit
    return fit
