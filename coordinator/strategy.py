"""The server strategy: Flower's FedAvg machinery with Offsite's aggregation rules and guards.

Sampling, messaging and timeouts are Flower's; the arithmetic is ``coordinator.aggregation``
(FedAvg, trimmed mean, (multi-)Krum; malformed or duplicate replies quarantined, update norms
bounded, claimed example counts capped). A round needs a quorum of usable updates, otherwise it
fails and the global adapter stays unchanged. With differential privacy the aggregate gets
Gaussian noise and the accountant refuses the round that would exceed the budget. A hook sees
every client's report with the server's verdict; ``round_log`` records each round's outcome.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from coordinator.aggregation import ClientUpdate, aggregate
from emulator.dp import add_gaussian_noise
from offsite.dp import BudgetExceeded, DpSchedule
from offsite.robust import AggregationRule

ClientReport = dict[str, Any]


class AdapterFedAvg(FedAvg):
    """FedAvg's round structure, aggregating adapter updates with ``rule``."""

    def __init__(
        self,
        on_client_report: Callable[[int, ClientReport], None],
        rule: AggregationRule | None = None,
        *,
        min_replies: int = 1,
        dp: DpSchedule | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self._on_client_report = on_client_report
        # DP-FedAvg: every clipped update counts the same (the noise is calibrated to one)
        self._rule = replace(rule or AggregationRule(), max_examples=1) if dp else rule
        self._rule = self._rule or AggregationRule()
        self._min_replies = min_replies
        self._dp = dp
        self._accountant = dp.accountant() if dp else None
        self._global: ArrayRecord | None = None
        self.round_log: list[dict[str, Any]] = []  # one entry per round: outcome, ε

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = arrays  # what this round's updates are measured against
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        reports: dict[str, ClientReport] = {}
        updates: list[ClientUpdate] = []
        valid: list[Message] = []
        for reply in replies:
            node = str(reply.metadata.src_node_id)
            if node in reports:
                reports[node]["quarantined"] = "sent more than one reply this round"
                updates = [u for u in updates if u.node != node]
                valid = [r for r in valid if str(r.metadata.src_node_id) != node]
                continue
            report: ClientReport = {"node-id": reply.metadata.src_node_id}
            reports[node] = report
            if reply.has_error():
                report["error"] = reply.error.reason
                continue
            for record in reply.content.metric_records.values():
                report.update(dict(record))
            update = _client_update(node, reply, self.arrayrecord_key, self.weighted_by_key)
            if isinstance(update, str):
                report["quarantined"] = update
                continue
            updates.append(update)
            valid.append(reply)
        arrays, metrics, outcome = self._combine(updates, valid, reports)
        entry: dict[str, Any] = {"round": server_round, "outcome": outcome}
        if self._accountant is not None:
            entry["epsilon"] = self._accountant.spent
        self.round_log.append(entry)
        for report in reports.values():
            self._on_client_report(server_round, report)
        return arrays, metrics

    def _combine(
        self, updates: list[ClientUpdate], valid: list[Message], reports: dict[str, ClientReport]
    ) -> tuple[ArrayRecord | None, MetricRecord | None, str]:
        """The next global adapter, or None (kept as is) with the reason."""
        if self._global is None:
            return None, None, "failed: no global adapter was sent this round"
        if len(updates) < self._min_replies:
            return (
                None,
                None,
                (f"failed: {len(updates)} usable updates, quorum is {self._min_replies}"),
            )
        global_state = self._global.to_torch_state_dict()
        try:
            result = aggregate(global_state, updates, self._rule)
        except ValueError as err:
            return None, None, f"failed: {err}"
        for node, reason in result.quarantined.items():
            reports[node]["quarantined"] = reason
        for node in result.clipped:
            reports[node]["clipped"] = 1
        if len(result.accepted) < self._min_replies:
            return (
                None,
                None,
                (f"failed: {len(result.accepted)} usable updates, quorum is {self._min_replies}"),
            )
        state = result.state
        if self._dp is not None and self._accountant is not None:
            try:
                self._accountant.spend_round()
            except BudgetExceeded as err:
                return None, None, f"stopped: {err}"
            std = self._dp.noise_multiplier * self._dp.clip_norm / len(result.accepted)
            state = add_gaussian_noise(state, std)
        accepted = set(result.accepted)
        contents = [r.content for r in valid if str(r.metadata.src_node_id) in accepted]
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return ArrayRecord(state), metrics, f"aggregated {len(accepted)} updates"


def _client_update(
    node: str, reply: Message, arrays_key: str, examples_key: str
) -> ClientUpdate | str:
    """The reply as an update, or why it cannot be one."""
    try:
        arrays = reply.content.array_records[arrays_key]
        state = arrays.to_torch_state_dict()
        metrics = next(iter(reply.content.metric_records.values()))
        examples = int(metrics[examples_key])
    except (KeyError, StopIteration, TypeError, ValueError) as err:
        return f"malformed reply: {err!r}"
    return ClientUpdate(node, state, examples)
