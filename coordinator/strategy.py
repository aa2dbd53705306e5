"""The server strategy: Flower's FedAvg machinery with Offsite's aggregation rules and guards.

Sampling, messaging and timeouts are Flower's; the arithmetic is ``coordinator.aggregation``
(FedAvg, trimmed mean, (multi-)Krum; malformed replies quarantined, update norms bounded,
claimed example counts capped). A hook sees every client's report, with the server's verdict.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from coordinator.aggregation import ClientUpdate, aggregate
from offsite.robust import AggregationRule

ClientReport = dict[str, Any]


class AdapterFedAvg(FedAvg):
    """FedAvg's round structure, aggregating adapter updates with ``rule``."""

    def __init__(
        self,
        on_client_report: Callable[[int, ClientReport], None],
        rule: AggregationRule | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self._on_client_report = on_client_report
        self._rule = rule or AggregationRule()
        self._global: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = arrays  # what this round's updates are measured against
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        reports: dict[str, ClientReport] = {}
        updates: list[ClientUpdate] = []
        valid: list[Message] = []
        for reply in replies:
            node = str(reply.metadata.src_node_id)
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
        arrays: ArrayRecord | None = None
        metrics: MetricRecord | None = None
        if updates and self._global is not None:
            try:
                result = aggregate(self._global.to_torch_state_dict(), updates, self._rule)
            except ValueError:
                result = None
            if result is not None:
                for node, reason in result.quarantined.items():
                    reports[node]["quarantined"] = reason
                for node in result.clipped:
                    reports[node]["clipped"] = 1
                arrays = ArrayRecord(result.state)
                accepted = set(result.accepted)
                contents = [r.content for r in valid if str(r.metadata.src_node_id) in accepted]
                metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        for report in reports.values():
            self._on_client_report(server_round, report)
        return arrays, metrics


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
