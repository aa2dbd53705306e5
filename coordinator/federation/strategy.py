"""The server strategy: Flower's FedAvg machinery with Offsite's aggregation rules and guards.

Sampling, messaging and timeouts are Flower's; the arithmetic is
``coordinator.federation.aggregation`` (FedAvg, trimmed mean, (multi-)Krum; malformed or duplicate
replies quarantined, update norms bounded, claimed example counts capped). A round needs a quorum of
usable updates, otherwise it fails and the global adapter stays unchanged. With differential privacy
the aggregate gets Gaussian noise and the accountant refuses the round that would exceed the budget.
A hook sees every client's report with the server's verdict; ``round_log`` records each round's
outcome.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from coordinator.federation.aggregation import ClientUpdate, aggregate
from coordinator.federation.merge_exact import MergeExact
from coordinator.federation.secure_rounds import (
    SecureRound,
    default_threshold,
    finish_round,
    setup_round,
)
from offsite.federation.dp import BudgetExceeded, DpSchedule
from offsite.federation.dp.mechanism import add_gaussian_noise
from offsite.federation.robust import AggregationRule
from offsite.federation.secagg import SecAggError
from offsite.federation.sparse_update import decode_update
from offsite.wire.messages import NUM_EXAMPLES, TrainReply, stamp_round, with_secagg_inbox

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
        secure: bool = False,
        secure_threshold: int = 0,
        stage_timeout: float | None = None,
        round_offset: int = 0,
        merge: MergeExact | None = None,
        **kwargs: Any,
    ):
        super().__init__(weighted_by_key=NUM_EXAMPLES, **kwargs)
        self._on_client_report = on_client_report
        # DP-FedAvg: every clipped update counts the same (the noise is calibrated to one)
        self._rule: AggregationRule = (
            replace(rule or AggregationRule(), max_examples=1) if dp else rule or AggregationRule()
        )
        self._min_replies = min_replies
        self._dp = dp
        self._accountant = dp.accountant() if dp else None
        # a resumed run: Flower counts from 1 again, clients and logs see the real round
        self._offset = round_offset
        if self._accountant is not None:
            self._accountant.rounds = round_offset  # privacy already spent
        self._global: ArrayRecord | None = None
        self._secure_enabled, self._secure_threshold = secure, secure_threshold
        self._stage_timeout = stage_timeout
        self._secure: SecureRound | None = None
        self._secure_failure = ""
        self._sent: list[Message] = []
        self.round_log: list[dict[str, Any]] = []  # one entry per round: outcome, ε
        self._lora_product_error: float | None = None  # of the last round FedAvg aggregated
        # merge-exact LoRA aggregation (coordinator.federation.merge_exact); None = naive
        self._merge = merge
        self._round = round_offset  # the run's round being trained
        self._download_bytes = 0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = arrays  # what this round's updates are measured against
        self._round = server_round + self._offset
        self._download_bytes = _array_bytes(arrays)  # what each sampled node receives
        messages = list(super().configure_train(server_round, arrays, config, grid))
        stamp_round(config, server_round + self._offset)  # shared by the messages' records
        self._sent = messages  # the grid stamps their ids when it pushes them
        if not self._secure_enabled:
            return messages
        # Secure aggregation: key agreement with the sampled nodes before they train; each
        # train message carries the encrypted key shares addressed to its node.
        nodes = [m.metadata.dst_node_id for m in messages]
        threshold = self._secure_threshold or default_threshold(len(nodes))
        self._secure, self._secure_failure = None, ""
        try:
            label = f"round-{server_round}-{os.urandom(8).hex()}"
            self._secure = setup_round(grid, nodes, threshold, label, self._stage_timeout)
        except SecAggError as err:
            self._secure_failure = f"failed: secure aggregation setup: {err}"
            return []
        out = []
        for node, inbox in self._secure.inbox.items():
            node_config = with_secagg_inbox(config, inbox)
            record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: node_config})
            out.append(Message(content=record, dst_node_id=node, message_type=MessageType.TRAIN))
        self._sent = out
        return out

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        reports: dict[str, ClientReport] = {}
        updates: list[ClientUpdate] = []
        valid: list[Message] = []
        masked: dict[int, np.ndarray] = {}
        sent_ids = {m.metadata.message_id for m in self._sent if m.metadata.message_id}
        stale_nodes: set[str] = set()
        for reply in replies:
            node = str(reply.metadata.src_node_id)
            if sent_ids and reply.metadata.reply_to_message_id not in sent_ids:
                stale = {"node-id": reply.metadata.src_node_id, "quarantined": "stale reply"}
                self._on_client_report(server_round, stale)  # not this round's instruction
                stale_nodes.add(node)
                continue
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
            report["received-bytes"] = sum(map(_array_bytes, reply.content.array_records.values()))
            if self._secure_enabled:
                vector = _masked_vector(reply, self.arrayrecord_key)
                if isinstance(vector, str):
                    report["quarantined"] = vector
                else:
                    masked[int(reply.metadata.src_node_id)] = vector
                continue
            update = _client_update(node, reply, self.arrayrecord_key, self._global)
            if isinstance(update, str):
                report["quarantined"] = update
                continue
            updates.append(update)
            valid.append(reply)
        for message in self._sent:
            silent = str(message.metadata.dst_node_id)
            if silent not in reports and silent not in stale_nodes:
                reports[silent] = {
                    "node-id": message.metadata.dst_node_id,
                    "error": "no reply before the round deadline (federation.round_timeout)",
                }
        self._lora_product_error = None  # only a plain FedAvg round measures it
        if self._secure_enabled:
            arrays, metrics, outcome = self._combine_secure(masked)
        else:
            arrays, metrics, outcome = self._combine(updates, valid, reports)
        entry: dict[str, Any] = {"round": server_round + self._offset, "outcome": outcome}
        entry["download_bytes"] = self._download_bytes
        if self._lora_product_error is not None:
            entry["lora_product_error"] = self._lora_product_error
        if self._accountant is not None:
            entry["epsilon"] = self._accountant.spent
        self.round_log.append(entry)
        for report in reports.values():
            self._on_client_report(server_round, report)
        return arrays, metrics

    def _combine_secure(
        self, masked: dict[int, np.ndarray]
    ) -> tuple[ArrayRecord | None, MetricRecord | None, str]:
        """Unmask the sum; any protocol failure fails the round without a partial result."""
        if self._secure is None or self._global is None:
            return None, None, self._secure_failure or "failed: no secure round was set up"
        secure, self._secure = self._secure, None
        if len(masked) < self._min_replies:
            return (
                None,
                None,
                f"failed: {len(masked)} masked updates, quorum is {self._min_replies}",
            )
        global_state = self._global.to_torch_state_dict()
        template = self._merge.secure_template(global_state) if self._merge else global_state
        try:
            state, count = finish_round(secure, masked, template)
        except SecAggError as err:
            return None, None, f"failed: secure aggregation: {err}"
        if self._merge is not None:  # the sum was of dense ΔW: fold it, restart LoRA
            state = self._merge.after_secure(state, global_state, self._round)
        if self._accountant is not None:
            try:
                self._accountant.spend_round()  # the noise was added by the clients
            except BudgetExceeded as err:
                return None, None, f"stopped: {err}"
        return ArrayRecord(state), None, f"aggregated {count} updates (secure)"

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
            if self._merge is not None:
                result = self._merge.aggregate(global_state, updates, self._rule, self._round)
            else:
                result = aggregate(global_state, updates, self._rule)
        except ValueError as err:
            return None, None, f"failed: {err}"
        self._lora_product_error = result.lora_product_error
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
            noise = self._merge.add_noise if self._merge else add_gaussian_noise
            state = noise(state, std)
        accepted = set(result.accepted)
        contents = [r.content for r in valid if str(r.metadata.src_node_id) in accepted]
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return ArrayRecord(state), metrics, f"aggregated {len(accepted)} updates"


def _array_bytes(arrays: ArrayRecord) -> int:
    """The serialized size of an array record's tensors (what crosses the wire for it)."""
    return sum(len(array.data) for array in arrays.values())


def _masked_vector(reply: Message, arrays_key: str) -> np.ndarray | str:
    try:
        vector = reply.content.array_records[arrays_key]["masked"].numpy()
    except (KeyError, TypeError, ValueError) as err:
        return f"malformed secure-aggregation reply: {err!r}"
    if vector.dtype != np.uint64 or vector.ndim != 1:
        return f"masked vector is {vector.dtype}{list(vector.shape)}, expected a uint64 vector"
    return vector


def _client_update(
    node: str,
    reply: Message,
    arrays_key: str,
    global_arrays: ArrayRecord | None,
) -> ClientUpdate | str:
    """The reply as an update (a sparse upload rebuilt against the global adapter), or why it
    cannot be one."""
    try:
        arrays = reply.content.array_records[arrays_key]
        state: Mapping[str, torch.Tensor] = arrays.to_torch_state_dict()
        metrics = next(iter(reply.content.metric_records.values()))
        sent = TrainReply.from_record(metrics)
        if sent.sparse_upload and global_arrays is not None:
            state = decode_update(state, global_arrays.to_torch_state_dict())
    except (KeyError, StopIteration, TypeError, ValueError, RuntimeError) as err:
        return f"malformed reply: {err!r}"
    return ClientUpdate(node, state, sent.num_examples)
