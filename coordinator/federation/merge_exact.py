"""Merge-exact LoRA aggregation: average the clients' ΔW, fold it into the base, restart LoRA.

Naive FedAvg of LoRA factors applies mean(B)·mean(A), not the mean of the updates B·A the
clients learned. The model owner holds the adapter blocks' weights, so it can do better: under
``federation.lora_aggregation = "merge-exact"`` the global adapter carries the base weights of
the adapter blocks' LoRA'd linears beside the LoRA factors, and each round

1. every client trains a LoRA (of its own rank, ≤ the global one) on top of the base weights it
   received and uploads its factors (or, under secure aggregation, its dense ΔW, masked);
2. the coordinator computes each client's ΔW = alpha/r · B·A, combines them with the run's rule
   (FedAvg weights and norm bounding streamed one module at a time, so the coordinator holds
   one float64 accumulator per base weight however many clients reply; trimmed mean and Krum
   through ``coordinator.federation.aggregation.aggregate``, which holds every client's dense
   ΔW) and adds the result to the base weights;
3. the next round's adapter is the merged base with a fresh LoRA: A drawn from a seed shared by
   the round (the run's seed and the round number), B zero, so it adds nothing yet.

The result equals the central mean of the clients' products (checked to 1e-6 in
``tests/coordinator/test_merge_exact.py``) for any mix of ranks. DP noise lands on the base
weights only (= on the mean ΔW); the fresh LoRA stays noise-free. What it costs: the merged base
weights travel to every sampled client each round (the adapter blocks' targeted linears, dense,
fp32), and under secure aggregation the upload is a dense ΔW instead of two thin factors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from coordinator.federation.aggregation import (
    AggregationResult,
    ClientUpdate,
    aggregate,
    lora_product_error,
)
from emulator.lora_merge import (
    LORA_A,
    LORA_B,
    base_name,
    fresh_lora,
    lora_deltas,
    lora_modules,
    split_bases,
)
from offsite.federation.dp.mechanism import add_gaussian_noise
from offsite.federation.robust import AggregationRule

ROUND_SEED_STRIDE = 1_000_003  # the fresh LoRA of round t is drawn from seed·stride + t


@dataclass(frozen=True)
class MergeExact:
    """Merge-exact aggregation for a run (``lora_alpha`` of its adapter, ``seed`` of its
    config); ``fan_in_fan_out`` for GPT-2 style Conv1D base weights."""

    lora_alpha: int
    seed: int
    fan_in_fan_out: bool = False

    def round_seed(self, server_round: int) -> int:
        return self.seed * ROUND_SEED_STRIDE + server_round

    def aggregate(
        self,
        global_state: Mapping[str, torch.Tensor],
        updates: Sequence[ClientUpdate],
        rule: AggregationRule,
        server_round: int,
    ) -> AggregationResult:
        """The merged base (plus the rule's combination of the clients' ΔW) with a fresh LoRA
        for round ``server_round + 1``. Raises ``ValueError`` when no update is usable."""
        bases, lora = split_bases(global_state)
        quarantined: dict[str, str] = {}
        usable: list[ClientUpdate] = []
        for update in updates:
            problem = factor_problem(update.state, lora)
            if problem:
                quarantined[update.node] = problem
            elif update.num_examples < 1:
                quarantined[update.node] = f"claims {update.num_examples} training examples"
            else:
                usable.append(update)
        if not usable:
            raise ValueError(f"no usable client update this round: {quarantined}")
        if rule.name == "fedavg":
            result = self._fedavg(bases, lora, usable, rule)
        else:  # robust rules compare whole updates: every client's dense ΔW is held
            deltas = [
                ClientUpdate(
                    u.node,
                    lora_deltas(u.state, self.lora_alpha, lora, self.fan_in_fan_out),
                    u.num_examples,
                )
                for u in usable
            ]
            zero = {n: torch.zeros_like(base, dtype=torch.float64) for n, base in bases.items()}
            result = aggregate(zero, deltas, rule)
        result.quarantined.update(quarantined)
        kept = {u.node: u for u in updates}
        accepted = [kept[node] for node in result.accepted]
        result.lora_product_error = _naive_error(accepted, rule)
        result.state = self.next_adapter(
            {n: (bases[n].double() + result.state[n]).to(bases[n].dtype) for n in bases},
            lora,
            server_round,
        )
        return result

    def _fedavg(
        self,
        bases: Mapping[str, torch.Tensor],
        lora: Mapping[str, torch.Tensor],
        updates: Sequence[ClientUpdate],
        rule: AggregationRule,
    ) -> AggregationResult:
        """FedAvg of the clients' ΔW (norm-bounded by ``rule.max_update_norm``), one module at
        a time: memory is one float64 accumulator per base weight, whatever the number of
        clients (no client's dense ΔW is kept). Same numbers as ``aggregate`` on dense ΔW."""
        modules = lora_modules(lora)
        weights = [
            float(min(u.num_examples, rule.max_examples) if rule.max_examples else u.num_examples)
            for u in updates
        ]
        factors = [1.0] * len(updates)
        clipped = []
        if rule.max_update_norm > 0:
            for i, update in enumerate(updates):
                squared = sum(
                    float(self._delta(update.state, lora, a_name).pow(2).sum())
                    for a_name in modules
                )
                norm = squared**0.5
                if norm > rule.max_update_norm:
                    factors[i] = rule.max_update_norm / norm
                    clipped.append(update.node)
        total = sum(weights)
        mean = {}
        for a_name in modules:
            accumulator = torch.zeros(bases[base_name(a_name)].shape, dtype=torch.float64)
            for update, weight, factor in zip(updates, weights, factors, strict=True):
                delta = self._delta(update.state, lora, a_name)
                accumulator.add_(delta, alpha=weight * factor / total)
            mean[base_name(a_name)] = accumulator
        return AggregationResult(mean, [u.node for u in updates], clipped=clipped)

    def _delta(
        self, state: Mapping[str, torch.Tensor], lora: Mapping[str, torch.Tensor], a_name: str
    ) -> torch.Tensor:
        """One module's ΔW of a client (float64, the base weight's layout)."""
        b_name = a_name[: -len(LORA_A)] + LORA_B
        pair = {a_name: state[a_name], b_name: state[b_name]}
        start = {a_name: lora[a_name], b_name: lora[b_name]}
        return lora_deltas(pair, self.lora_alpha, start, self.fan_in_fan_out)[base_name(a_name)]

    def next_adapter(
        self,
        bases: Mapping[str, torch.Tensor],
        lora: Mapping[str, torch.Tensor],
        server_round: int,
    ) -> dict[str, torch.Tensor]:
        """Merged ``bases`` with a fresh LoRA shaped like ``lora`` (the next round's start)."""
        return {**bases, **fresh_lora(lora, self.round_seed(server_round + 1))}

    def secure_template(self, global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What a secure round's masked sum is laid out like: the base weights (clients mask
        their dense ΔW in the base weights' name order)."""
        return split_bases(global_state)[0]

    def after_secure(
        self,
        merged_bases: Mapping[str, torch.Tensor],
        global_state: Mapping[str, torch.Tensor],
        server_round: int,
    ) -> dict[str, torch.Tensor]:
        """The next adapter from a secure round's base + mean ΔW."""
        return self.next_adapter(merged_bases, split_bases(global_state)[1], server_round)

    @staticmethod
    def add_noise(state: Mapping[str, torch.Tensor], std: float) -> dict[str, torch.Tensor]:
        """DP noise on the merged base weights (= on the mean ΔW), none on the fresh LoRA."""
        bases, lora = split_bases(state)
        return {**add_gaussian_noise(bases, std), **lora}


def factor_problem(
    state: Mapping[str, torch.Tensor], lora: Mapping[str, torch.Tensor]
) -> str | None:
    """Why a client's LoRA factors cannot be merged (names, shapes, rank, values), or None."""
    if set(state) != set(lora):
        missing = sorted(set(lora) - set(state))[:2]
        extra = sorted(set(state) - set(lora))[:2]
        return f"tensor names differ from the global LoRA (missing {missing}, extra {extra})"
    for a_name in lora_modules(lora):
        b_name = a_name[: -len(LORA_A)] + LORA_B
        a, b, a0, b0 = state[a_name], state[b_name], lora[a_name], lora[b_name]
        rank = a.shape[0] if a.ndim == 2 else -1
        if not (
            a.ndim == 2
            and b.ndim == 2
            and 1 <= rank <= a0.shape[0]
            and a.shape[1] == a0.shape[1]
            and b.shape == (b0.shape[0], rank)
        ):
            return (
                f"{a_name} / lora_B have shapes {list(a.shape)} / {list(b.shape)}; expected "
                f"rank <= {a0.shape[0]} factors of a {b0.shape[0]} x {a0.shape[1]} weight"
            )
    for name, tensor in state.items():
        if not torch.isfinite(tensor).all():
            return f"{name} holds non-finite values"
    return None


def _naive_error(updates: Sequence[ClientUpdate], rule: AggregationRule) -> float | None:
    """What naive factor averaging would have erred on these clients (FedAvg, equal ranks)."""
    if rule.name != "fedavg" or not updates:
        return None
    shapes = {tuple(tuple(t.shape) for _, t in sorted(u.state.items())) for u in updates}
    if len(shapes) != 1:
        return None  # mixed ranks: naive averaging cannot even add them
    weights = [
        float(min(u.num_examples, rule.max_examples) if rule.max_examples else u.num_examples)
        for u in updates
    ]
    return lora_product_error([u.state for u in updates], weights)


def round_transfer_bytes(state: Mapping[str, torch.Tensor], secure: bool) -> dict[str, int]:
    """What one client moves per round for the global adapter ``state`` (fp32 tensors): the
    download (every tensor of it) and a full-rank client's upload — the trained tensors (the
    LoRA factors; a merge-exact adapter's base weights are not sent back), or under secure
    aggregation the masked vector, 8 bytes per value of the update (a merge-exact update is
    the dense ΔW of every base weight) plus the weight."""
    bases, rest = split_bases(state)
    download = sum(4 * t.numel() for t in state.values())
    if secure:
        values = sum(t.numel() for t in (bases or rest).values())
        upload = 8 * (values + 1)
    else:
        upload = sum(4 * t.numel() for t in rest.values())
    return {"download_bytes": download, "upload_bytes": upload}


class MergeCollector:
    """A round's updates under merge-exact, gathered as they arrive (the ``Collector`` of
    ``coordinator.federation.aggregation``). It holds each accepted client's LoRA factors —
    thin (rank × width), ~1.3 MB per client on the default model — and merges them in
    ``result``; no client's dense ΔW is built before then (FedAvg)."""

    def __init__(
        self,
        merge: MergeExact,
        global_state: Mapping[str, torch.Tensor],
        rule: AggregationRule,
        server_round: int,
    ):
        self._merge, self._global, self._rule, self._round = merge, global_state, rule, server_round
        self._lora = split_bases(global_state)[1]
        self._updates: list[ClientUpdate] = []
        self.accepted: list[str] = []
        self.quarantined: dict[str, str] = {}

    def add(self, update: ClientUpdate) -> None:
        problem = factor_problem(update.state, self._lora)
        if problem:
            self.quarantined[update.node] = problem
        elif update.num_examples < 1:
            self.quarantined[update.node] = f"claims {update.num_examples} training examples"
        elif not self._rule.streams and len(self._updates) >= self._rule.max_buffered:
            self.quarantined[update.node] = (
                f"more than max_buffered={self._rule.max_buffered} updates this round"
            )
        else:
            self._updates.append(update)
            self.accepted.append(update.node)

    def result(self) -> AggregationResult:
        updates, self._updates = self._updates, []
        result = self._merge.aggregate(self._global, updates, self._rule, self._round)
        result.quarantined.update(self.quarantined)
        return result
