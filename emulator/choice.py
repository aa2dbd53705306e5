"""The owner's trade-off, explicit: choose an emulator from measured protocol cells by gates.

`offsite bench emulator` measures candidate emulators with the five-way protocol on a public
proxy task (bench/reports/emulator_transfer.json: plug-in, margin = plug-in − emulator
fine-tuned, bundle size, verbatim middle tensors, perplexity ratio, each over seeds). The owner
states what it will not ship — a margin below ``min_margin`` (the data owner would be better off
with the emulator than with the product), any middle tensor shipped verbatim beyond
``max_verbatim_fraction``, a perplexity ratio below ``min_perplexity_ratio`` — and the best
plug-in among the cells that pass is chosen. Margins are judged by the lower end of their 95 %
confidence interval when there are several seeds (a noisy margin does not pass on its mean), the
others on their measured value. Every refusal is stated, so the owner sees why.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Gates:
    min_margin: float
    max_verbatim_fraction: float
    min_perplexity_ratio: float


@dataclass(frozen=True)
class Candidate:
    name: str
    overrides: tuple[str, ...]
    seeds: int
    plug_in: float
    plug_in_ci: float
    margin: float
    margin_ci: float
    bundle_fraction: float
    verbatim_fraction: float
    perplexity_ratio: float | None
    build_s: float

    @property
    def margin_low(self) -> float:
        """The margin's conservative value: the lower end of its interval when it has one."""
        return self.margin - (0.0 if math.isnan(self.margin_ci) else self.margin_ci)


def candidates(report: Mapping[str, Any]) -> list[Candidate]:
    """Every measured cell of a bench/reports/emulator_transfer.json document that says how it
    was built (its config overrides)."""
    out = []
    for name, cell in report.get("cells", {}).items():
        if "overrides" not in cell or "plug_in" not in cell:
            continue
        ratio = cell.get("perplexity_ratio")
        out.append(
            Candidate(
                name=name,
                overrides=tuple(cell["overrides"]),
                seeds=int(cell["seeds"]),
                plug_in=float(cell["plug_in"]["mean"]),
                plug_in_ci=float(cell["plug_in"]["ci95"]),
                margin=float(cell["margin"]["mean"]),
                margin_ci=float(cell["margin"]["ci95"]),
                bundle_fraction=cell["bundle_bytes"] / cell["full_model_bytes"],
                verbatim_fraction=cell["verbatim_middle_tensors"] / max(cell["middle_tensors"], 1),
                perplexity_ratio=None if ratio is None else float(ratio),
                build_s=float(cell["build_s"]),
            )
        )
    return out


def refusals(candidate: Candidate, gates: Gates) -> list[str]:
    """Why ``candidate`` may not ship under ``gates`` (empty when it passes)."""
    out = []
    if candidate.margin_low < gates.min_margin:
        out.append(
            f"margin {candidate.margin:+.1f} (low end {candidate.margin_low:+.1f}) is below "
            f"emulator.min_margin {gates.min_margin:+.1f}"
        )
    if candidate.verbatim_fraction > gates.max_verbatim_fraction:
        out.append(
            f"{100 * candidate.verbatim_fraction:.0f} % of middle tensors verbatim is above "
            f"emulator.max_verbatim_fraction {100 * gates.max_verbatim_fraction:.0f} %"
        )
    if gates.min_perplexity_ratio > 0 and (
        candidate.perplexity_ratio is None
        or candidate.perplexity_ratio < gates.min_perplexity_ratio
    ):
        measured = (
            "none" if candidate.perplexity_ratio is None else f"{candidate.perplexity_ratio:.2f}"
        )
        out.append(
            f"perplexity ratio {measured} is below emulator.min_perplexity_ratio "
            f"{gates.min_perplexity_ratio:.2f}"
        )
    return out


def pareto_front(cells: Sequence[Candidate]) -> list[Candidate]:
    """The cells no other cell beats on all of plug-in (higher), margin (higher) and bundle
    share (smaller) at once, best plug-in first."""

    def dominated(a: Candidate, b: Candidate) -> bool:  # b dominates a
        at_least = (
            b.plug_in >= a.plug_in
            and b.margin >= a.margin
            and b.bundle_fraction <= a.bundle_fraction
        )
        better = (
            b.plug_in > a.plug_in or b.margin > a.margin or b.bundle_fraction < a.bundle_fraction
        )
        return at_least and better

    front = [a for a in cells if not any(dominated(a, b) for b in cells if b is not a)]
    return sorted(front, key=lambda c: -c.plug_in)


def choose(
    cells: Iterable[Candidate], gates: Gates
) -> tuple[Candidate | None, dict[str, list[str]]]:
    """The passing cell with the best plug-in (ties: the larger margin), and every cell's
    refusals by name."""
    cells = list(cells)
    reasons = {c.name: refusals(c, gates) for c in cells}
    passing = [c for c in cells if not reasons[c.name]]
    best = max(passing, key=lambda c: (c.plug_in, c.margin), default=None)
    return best, reasons


def describe(candidate: Candidate) -> str:
    """One line: what the owner gets and gives with this cell."""
    return (
        f"{candidate.name}: plug-in {candidate.plug_in:.1f} ± {candidate.plug_in_ci:.1f}, "
        f"margin {candidate.margin:+.1f} ± {candidate.margin_ci:.1f} ({candidate.seeds} seeds), "
        f"bundle {100 * candidate.bundle_fraction:.0f} % of the full model, "
        f"{100 * candidate.verbatim_fraction:.0f} % middle tensors verbatim, "
        f"build {candidate.build_s:.0f} s"
    )
