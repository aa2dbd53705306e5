"""Aggregation rules and server strategies as configuration: names, parameters, preconditions.

Kept free of torch and flwr so the configuration can check a choice before anything runs; the
arithmetic is in ``coordinator.federation.aggregation`` (rules) and Flower's strategies
(``coordinator.federation.strategy``).

Two independent choices:

- the *aggregation rule* combines one round's client updates: ``fedavg`` (example-weighted mean,
  folded as replies stream in, memory independent of the number of clients) or a robust rule,
  Flower's ``FedTrimmedAvg`` / ``FedMedian`` / ``Krum`` / ``MultiKrum`` / ``Bulyan`` arithmetic.
  Robust rules must see every update of a round at once, so the coordinator holds them all:
  memory grows as clients x adapter size, and ``max_buffered`` bounds the clients per round.
- the *server strategy* (Flower's FedAvg / FedProx / FedAdam / FedYogi / FedAdagrad / FedAvgM)
  decides what the coordinator does with that aggregate: take it as the next global adapter
  (fedavg, fedprox), or treat ``aggregate − global`` as a pseudo-gradient step for a server
  optimizer (Reddi et al. 2021; Hsu et al. 2019). FedProx acts on the clients instead: a
  proximal term ``mu/2 ||w − w_global||²`` in their local loss (Li et al. 2020).

Preconditions: trimmed mean must keep at least one value per coordinate; Krum needs n >= 2f + 3
clients per round to tolerate f Byzantine ones, Bulyan n >= 4f + 3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

RULES = ("fedavg", "trimmed-mean", "median", "krum", "multi-krum", "bulyan")
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm")
# the server-optimizer step applies to the aggregate (and composes with DP and secure
# aggregation: it only post-processes what the coordinator may already see)
SERVER_OPTIMIZERS = ("fedadam", "fedyogi", "fedadagrad", "fedavgm")
# Flower's defaults for eta / server_learning_rate (used when server_lr is 0)
DEFAULT_SERVER_LR = {"fedadam": 0.1, "fedyogi": 0.01, "fedadagrad": 0.1, "fedavgm": 1.0}


@dataclass(frozen=True)
class AggregationRule:
    name: str = "fedavg"
    trim_fraction: float = 0.1  # trimmed mean: share cut from each end per coordinate
    byzantine: int = 0  # Krum / Bulyan: clients assumed malicious (f)
    krum_select: int = 0  # multi-Krum: updates averaged (0 = n - f)
    max_update_norm: float = 0.0  # 0 = no clipping
    max_examples: int = 0  # 0 = no cap
    max_buffered: int = 256  # robust rules: most updates held at once (clients per round)

    @property
    def streams(self) -> bool:
        """True when updates fold into a running sum as they arrive (nothing is buffered)."""
        return self.name == "fedavg"


@dataclass(frozen=True)
class ServerStrategy:
    """Which Flower strategy runs the rounds, with its hyperparameters."""

    name: str = "fedavg"
    proximal_mu: float = 0.0  # fedprox
    server_lr: float = 0.0  # fedadam/fedyogi/fedadagrad (eta), fedavgm; 0 = Flower's default
    beta1: float = 0.9  # fedadam/fedyogi
    beta2: float = 0.99  # fedadam/fedyogi
    tau: float = 1e-3  # fedadam/fedyogi/fedadagrad: adaptivity
    momentum: float = 0.0  # fedavgm

    @property
    def learning_rate(self) -> float:
        return self.server_lr or DEFAULT_SERVER_LR.get(self.name, 1.0)


# which ServerStrategy fields each strategy reads; setting another is a configuration error
_USES = {
    "fedavg": (),
    "fedprox": ("proximal_mu",),
    "fedadam": ("server_lr", "beta1", "beta2", "tau"),
    "fedyogi": ("server_lr", "beta1", "beta2", "tau"),
    "fedadagrad": ("server_lr", "tau"),
    "fedavgm": ("server_lr", "momentum"),
}
_KEYS = {
    "proximal_mu": "proximal_mu",
    "server_lr": "server_lr",
    "beta1": "server_beta1",
    "beta2": "server_beta2",
    "tau": "server_tau",
    "momentum": "server_momentum",
}


def strategy_problems(strategy: ServerStrategy) -> list[str]:
    """Why ``strategy`` is invalid or meaningless (empty when it is fine)."""
    if strategy.name not in STRATEGIES:
        return [f"unknown strategy {strategy.name!r}; use one of {', '.join(STRATEGIES)}"]
    out = []
    default = ServerStrategy()
    for attribute, key in _KEYS.items():
        if (
            getattr(strategy, attribute) != getattr(default, attribute)
            and attribute not in _USES[strategy.name]
        ):
            users = [s for s, uses in _USES.items() if attribute in uses]
            out.append(
                f"{key} applies only to strategy {' / '.join(map(repr, users))}, not "
                f"{strategy.name!r}; remove it or change the strategy"
            )
    if strategy.proximal_mu < 0:
        out.append("proximal_mu must be >= 0")
    elif strategy.name == "fedprox" and strategy.proximal_mu == 0:
        out.append("strategy 'fedprox' with proximal_mu=0 is FedAvg; set proximal_mu > 0")
    if strategy.server_lr < 0:
        out.append("server_lr must be > 0 (or 0 for Flower's default)")
    if not 0 <= strategy.beta1 < 1 or not 0 <= strategy.beta2 < 1:
        out.append("server_beta1 and server_beta2 must be in [0, 1)")
    if strategy.tau <= 0:
        out.append("server_tau must be > 0")
    if not 0 <= strategy.momentum < 1:
        out.append("server_momentum must be in [0, 1)")
    elif strategy.name == "fedavgm" and strategy.momentum == 0 and strategy.learning_rate == 1:
        out.append(
            "strategy 'fedavgm' with server_momentum=0 and server_lr=1 is FedAvg; set "
            "server_momentum > 0"
        )
    return out


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
    if rule.name in ("krum", "multi-krum", "bulyan"):
        if rule.byzantine < 0:
            out.append("byzantine must be >= 0")
        need, bound = (
            (4 * rule.byzantine + 3, "4f + 3")
            if rule.name == "bulyan"
            else (2 * rule.byzantine + 3, "2f + 3")
        )
        if clients < need:
            out.append(
                f"{rule.name} tolerates f={rule.byzantine} malicious clients only with n >= "
                f"{bound} = {need} clients per round, got {clients}"
            )
        if rule.name == "multi-krum" and rule.krum_select > clients - rule.byzantine:
            out.append("krum_select must be <= clients - byzantine")
    if not rule.streams and clients > rule.max_buffered:
        out.append(
            f"{rule.name} holds every update of a round in memory and {clients} clients per "
            f"round exceed max_buffered={rule.max_buffered}; raise it if the coordinator has "
            "the memory (clients x adapter size x 8 bytes, about 3x at the peak) or use fedavg"
        )
    return out
