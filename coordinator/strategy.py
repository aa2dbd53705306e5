"""FedAvg over the trainable adapter tensors, recording what each client reported."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

ClientReport = dict[str, Any]


class AdapterFedAvg(FedAvg):
    """Flower's FedAvg, plus a hook that sees every client's metrics before aggregation.

    The hook feeds the per-client loss curves of the run report; aggregation itself is Flower's
    weighted mean by ``num-examples`` over the trainable tensors only.
    """

    def __init__(self, on_client_report: Callable[[int, ClientReport], None], **kwargs: Any):
        super().__init__(**kwargs)
        self._on_client_report = on_client_report

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        for reply in replies:
            report: ClientReport = {"node-id": reply.metadata.src_node_id}
            if reply.has_error():
                report["error"] = reply.error.reason
            else:
                for record in reply.content.metric_records.values():
                    report.update(dict(record))
            self._on_client_report(server_round, report)
        return super().aggregate_train(server_round, replies)
