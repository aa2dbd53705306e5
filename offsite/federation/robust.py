"""Robust aggregation rules as configuration: names, parameters and their preconditions.

Kept free of torch so the configuration can check a rule before anything runs; the arithmetic is in
``coordinator.federation.aggregation``. Trimmed mean must keep at least one value per coordinate;
Krum needs n >= 2f + 3 clients per round to tolerate f Byzantine ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

RULES = ("fedavg", "trimmed-mean", "krum", "multi-krum")


@dataclass(frozen=True)
class AggregationRule:
    name: str = "fedavg"
    trim_fraction: float = 0.1  # trimmed mean: share cut from each end per coordinate
    byzantine: int = 0  # Krum: clients assumed malicious (f)
    krum_select: int = 0  # multi-Krum: updates averaged (0 = n - f)
    max_update_norm: float = 0.0  # 0 = no clipping
    max_examples: int = 0  # 0 = no cap


def rule_problems(rule: AggregationRule, clients: int) -> list[str]:
    """Why ``rule`` cannot work with ``clients`` replies per round (empty when it can)."""
    out = []
    if rule.name not in RULES:
        out.append(f"unknown aggregation rule {rule.name!r}; use one of {', '.join(RULES)}")
    if rule.max_update_norm < 0 or rule.max_examples < 0:
        out.append("max_update_norm and max_examples must be >= 0")
    if rule.name == "trimmed-mean":
        if not 0 <= rule.trim_fraction < 0.5:
            out.append("trim_fraction must be in [0, 0.5)")
        elif clients - 2 * math.floor(rule.trim_fraction * clients) < 1:
            out.append(f"trimmed mean with trim_fraction {rule.trim_fraction} keeps no client")
    if rule.name in ("krum", "multi-krum"):
        if rule.byzantine < 0:
            out.append("byzantine must be >= 0")
        if clients < 2 * rule.byzantine + 3:
            out.append(
                f"Krum tolerates f={rule.byzantine} malicious clients only with n >= 2f + 3 = "
                f"{2 * rule.byzantine + 3} clients per round, got {clients}"
            )
        if rule.name == "multi-krum" and rule.krum_select > clients - rule.byzantine:
            out.append("krum_select must be <= clients - byzantine")
    return out
