"""The server strategy: Flower's strategies with Offsite's aggregation rules and guards.

Sampling, messaging, timeouts and the server optimizers are Flower's (``FedAvg``, ``FedProx``,
``FedAdam``, ``FedYogi``, ``FedAdagrad``, ``FedAvgM``); the per-round arithmetic is
``coordinator.federation.aggregation`` (streamed FedAvg, or Flower's robust rules; malformed or
duplicate replies quarantined, update norms bounded, claimed example counts capped). A round
needs a quorum of usable updates, otherwise it fails and the global adapter stays unchanged.
With differential privacy the aggregate gets Gaussian noise and the accountant refuses the round
that would exceed the budget. A hook sees every client's report with the server's verdict;
``round_log`` records each round's outcome.

Decisions:

- Replies are folded as they arrive (``aggregate_train`` iterates once over what
  ``coordinator.federation.streaming.StreamingGrid`` yields), so a FedAvg or secure round holds
  one running sum, never every client's adapter; robust rules hold the round's updates, bounded
  by ``federation.max_buffered``.
- ``AdapterRounds`` sits *below* Flower's strategy in the method resolution order:
  ``AdapterFedAdam(FedAdam, AdapterRounds)`` makes Flower's ``FedAdam.aggregate_train`` call ours
  for the aggregate and apply its server-optimizer step to it (pseudo-gradient
  ``aggregate − global``), exactly as Flower's ``FedAdam`` does over its own FedAvg. That step
  post-processes what the coordinator sees anyway, so it composes with secure aggregation, DP
  (post-processing keeps the guarantee), sparse uploads and robust rules.
- The server optimizers' state (Adam's moments, FedAvgM's momentum) lives in the strategy
  object: a resumed run starts it afresh from the resumed adapter.
- FedProx's proximal term is the clients' (``emulator.train.train_adapter``); its ``mu``
  travels as ``TrainInstruction.proximal_mu``, the same record key Flower's ``FedProx`` writes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedProx, FedYogi

from coordinator.federation.aggregation import (
    AggregationResult,
    ClientUpdate,
    Collector,
    collector,
)
from coordinator.federation.merge_exact import MergeCollector, MergeExact
from coordinator.federation.secure_rounds import (
    SecureRound,
    default_threshold,
    finish_round,
    fold_masked,
    setup_round,
)
from offsite.federation.dp import BudgetExceeded, DpSchedule
from offsite.federation.dp.mechanism import add_gaussian_noise
from offsite.federation.robust import AggregationRule, ServerStrategy
from offsite.federation.secagg import SecAggError
from offsite.federation.sparse_update import decode_update
from offsite.wire.messages import NUM_EXAMPLES, TrainReply, stamp_round, with_secagg_inbox

ClientReport = dict[str, Any]


@dataclass(frozen=True)
class RoundSettings:
    """Offsite's settings of every round, beside the aggregation rule: the quorum, DP, secure
    aggregation, a resumed run's offset and merge-exact LoRA aggregation."""

    min_replies: int = 1
    dp: DpSchedule | None = None
    secure: bool = False
    secure_threshold: int = 0  # 0 = default_threshold(sampled nodes)
    stage_timeout: float | None = None  # secure aggregation's key-exchange stages
    round_offset: int = 0  # rounds a resumed run already completed
    merge: MergeExact | None = None  # merge-exact LoRA aggregation; None = naive
    # adapter tensors no client trains (LoRA's A under lora-fa): DP noise leaves them alone
    frozen: Callable[[str], bool] | None = None


class AdapterRounds(FedAvg):
    """FedAvg's round structure, aggregating adapter updates with a rule, under guards.

    Flower's constructors build it (it adds no ``__init__``, so a Flower strategy above it in
    the MRO passes its keywords straight to ``FedAvg``); ``setup`` adds Offsite's settings.
    """

    def setup(
        self,
        on_client_report: Callable[[int, ClientReport], None],
        rule: AggregationRule | None = None,
        settings: RoundSettings | None = None,
    ) -> None:
        settings = settings or RoundSettings()
        min_replies, dp, round_offset = settings.min_replies, settings.dp, settings.round_offset
        secure, secure_threshold = settings.secure, settings.secure_threshold
        stage_timeout, merge = settings.stage_timeout, settings.merge
        self._frozen = settings.frozen
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
        # merge-exact LoRA aggregation (coordinator.federation.merge_exact); None = naive
        self._merge = merge
        self._round = round_offset  # the run's round being trained
        self._download_bytes = 0  # what each sampled node receives this round

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = arrays  # what this round's updates are measured against
        self._round = server_round + self._offset
        self._download_bytes = _array_bytes(arrays)
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
            self._sent = []  # no train message goes out: none can miss the round deadline
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
        """Fold each reply as it arrives and release its tensors, then combine."""
        global_state = self._global.to_torch_state_dict() if self._global is not None else None
        into = (
            self._collector(global_state)
            if global_state is not None and not self._secure_enabled
            else None
        )
        round_ = _Round(
            server_round,
            {
                m.metadata.message_id: m.metadata.dst_node_id
                for m in self._sent
                if m.metadata.message_id
            },
            global_state,
            into,
            self._masked_size(global_state) if self._secure_enabled else None,
        )
        for reply in replies:
            try:
                self._take(round_, reply)
            finally:
                _release(reply)
        reports = round_.reports
        for message in self._sent:
            silent = str(message.metadata.dst_node_id)
            if silent not in reports and silent not in round_.stale_nodes:
                reports[silent] = {
                    "node-id": message.metadata.dst_node_id,
                    "error": "no reply before the round deadline (federation.round_timeout)",
                }
        product_error: float | None = None
        if self._secure_enabled:
            arrays, aggregated, outcome = self._combine_secure(round_.folded_secure)
        else:
            result, outcome = self._combine(into, reports)
            arrays, aggregated = None, None
            if result is not None:
                result.state = self._pin_frozen(result.state, global_state)
                arrays = ArrayRecord(self._privatize(result))
                accepted = [round_.metrics[n] for n in result.accepted if n in round_.metrics]
                aggregated = self.train_metrics_aggr_fn(accepted, self.weighted_by_key)
                product_error = result.lora_product_error
            if self._accountant is not None and arrays is not None:
                try:
                    self._accountant.spend_round()
                except BudgetExceeded as err:
                    arrays, aggregated, outcome = None, None, f"stopped: {err}"
        entry: dict[str, Any] = {"round": server_round + self._offset, "outcome": outcome}
        entry["download_bytes"] = self._download_bytes
        if product_error is not None:
            entry["lora_product_error"] = product_error
        if self._accountant is not None:
            entry["epsilon"] = self._accountant.spent
        self.round_log.append(entry)
        for report in reports.values():
            self._on_client_report(server_round, report)
        return arrays, aggregated

    def _collector(self, global_state: dict[str, torch.Tensor]) -> Collector:
        """Where this round's updates go: the rule's running mean or buffer (the hook for other
        aggregation modes)."""
        if self._merge is not None:
            return MergeCollector(self._merge, global_state, self._rule, self._round)
        return collector(global_state, self._rule)

    def _take(self, round_: _Round, reply: Message) -> None:
        """Check one reply, record its report, and fold its update into the round."""
        # The node an instruction went to answers for it: the SuperLink's own error replies
        # (a node unavailable, a reply expired) carry its id, not the node's.
        node_id = round_.sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        node = str(node_id)
        if round_.sent and reply.metadata.reply_to_message_id not in round_.sent:
            stale = {"node-id": node_id, "quarantined": "stale reply"}
            self._on_client_report(round_.number, stale)  # not this round's instruction
            round_.stale_nodes.add(node)
            return
        if node in round_.reports:
            # Flower's SuperLink stores one reply per instruction, so only a faulty grid
            # gets here; the first reply may already be in the running sum: it stays.
            extra = {
                "node-id": node_id,
                "quarantined": "sent more than one reply this round (the first counted)",
            }
            self._on_client_report(round_.number, extra)
            return
        report: ClientReport = {"node-id": node_id}
        round_.reports[node] = report
        if reply.has_error():
            report["error"] = reply.error.reason
            return
        for record in reply.content.metric_records.values():
            report.update(dict(record))
        report["received-bytes"] = sum(map(_array_bytes, reply.content.array_records.values()))
        if self._secure_enabled:
            reason = self._fold_secure(reply, round_.masked_size)
            if reason:
                report["quarantined"] = reason
            else:
                round_.folded_secure += 1
            return
        update = _client_update(node, reply, self.arrayrecord_key, round_.global_state)
        if isinstance(update, str):
            report["quarantined"] = update
            return
        if round_.into is not None:
            round_.into.add(update)
            if node in round_.into.quarantined:
                report["quarantined"] = round_.into.quarantined[node]
                return
        round_.metrics[node] = RecordDict(dict(reply.content.metric_records))

    def _masked_size(self, global_state: Mapping[str, torch.Tensor] | None) -> int | None:
        """Values in each masked vector but the weight: what the clients mask is the adapter,
        or under merge-exact the dense ΔW of the LoRA modules' bases (None: unknown)."""
        if not global_state:
            return None
        layout = self._merge.secure_template(global_state) if self._merge else global_state
        return sum(t.numel() for t in layout.values())

    def _fold_secure(self, reply: Message, masked_size: int | None) -> str | None:
        """Fold a masked reply into the secure round's sum; why it cannot count, or None."""
        if self._secure is None:
            return "no secure round was set up"
        vector = _masked_vector(reply, self.arrayrecord_key)
        if isinstance(vector, str):
            return vector
        return fold_masked(self._secure, int(reply.metadata.src_node_id), vector, masked_size)

    def _combine_secure(self, folded: int) -> tuple[ArrayRecord | None, MetricRecord | None, str]:
        """Unmask the sum; any protocol failure fails the round without a partial result."""
        if self._secure is None or self._global is None:
            return None, None, self._secure_failure or "failed: no secure round was set up"
        secure, self._secure = self._secure, None
        if folded < self._min_replies:
            return None, None, f"failed: {folded} masked updates, quorum is {self._min_replies}"
        global_state = self._global.to_torch_state_dict()
        template = self._merge.secure_template(global_state) if self._merge else global_state
        try:
            state, count = finish_round(secure, template)
        except SecAggError as err:
            return None, None, f"failed: secure aggregation: {err}"
        if self._merge is not None:  # the sum was of dense ΔW: fold it, restart LoRA
            state = self._merge.after_secure(state, global_state, self._round)
        state = self._pin_frozen(state, global_state)
        if self._accountant is not None:
            try:
                self._accountant.spend_round()  # the noise was added by the clients
            except BudgetExceeded as err:
                return None, None, f"stopped: {err}"
        return ArrayRecord(state), None, f"aggregated {count} updates (secure)"

    def _combine(
        self, into: Collector | None, reports: dict[str, ClientReport]
    ) -> tuple[AggregationResult | None, str]:
        """The round's aggregate, or None (the global stays as it is) with the reason."""
        if into is None:
            return None, "failed: no global adapter was sent this round"
        if len(into.accepted) < self._min_replies:
            usable = len(into.accepted)
            return None, f"failed: {usable} usable updates, quorum is {self._min_replies}"
        try:
            result: AggregationResult = into.result()
        except ValueError as err:
            return None, f"failed: {err}"
        for node in result.clipped:
            reports[node]["clipped"] = 1
        return result, f"aggregated {len(result.accepted)} updates"

    def _privatize(self, result: AggregationResult) -> dict[str, torch.Tensor]:
        """The aggregate, with the DP noise calibrated to one clipped update when DP is on."""
        if self._dp is None:
            return result.state
        std = self._dp.noise_multiplier * self._dp.clip_norm / len(result.accepted)
        if self._merge:
            return self._merge.add_noise(result.state, std)
        return add_gaussian_noise(result.state, std, frozen=self._frozen)

    def _pin_frozen(
        self, state: dict[str, torch.Tensor], global_state: Mapping[str, torch.Tensor] | None
    ) -> dict[str, torch.Tensor]:
        """Tensors no client trains (LoRA's A under lora-fa) stay the global ones, whatever
        the replies held: an honest node's update of them is zero, a dishonest one's is not
        the adapter's to take, and their average would carry unnoised data under DP."""
        if self._frozen is None or global_state is None:
            return state
        return {k: global_state[k] if self._frozen(k) else v for k, v in state.items()}


class AdapterFedAvg(AdapterRounds):
    """FedAvg over adapter updates (the aggregate is the next global adapter); ``flower``
    holds Flower's sampling keywords."""

    def __init__(
        self,
        on_client_report: Callable[[int, ClientReport], None],
        rule: AggregationRule | None = None,
        settings: RoundSettings | None = None,
        **flower: Any,
    ):
        super().__init__(weighted_by_key=NUM_EXAMPLES, **flower)
        self.setup(on_client_report, rule, settings)


class _KeepDtypes(FedAvg):
    """Cast a server optimizer's new global back to the dtypes the round started from (Flower's
    FedAdam computes its bias correction in float64 and would otherwise double the adapter)."""

    _start_dtypes: dict[str, str] | None = None  # numpy dtype names, set per round

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._start_dtypes = {k: array.dtype for k, array in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        dtypes = self._start_dtypes
        if arrays is None or dtypes is None:
            return arrays, metrics
        cast = {k: Array(a.numpy().astype(dtypes[k], copy=False)) for k, a in arrays.items()}
        return ArrayRecord(cast), metrics


class AdapterFedProx(FedProx, AdapterRounds):
    """Flower's FedProx: FedAvg on the server, a proximal term on the clients."""


class AdapterFedAdam(_KeepDtypes, FedAdam, AdapterRounds):
    """Flower's FedAdam: an Adam step on the pseudo-gradient ``aggregate − global``."""


class AdapterFedYogi(_KeepDtypes, FedYogi, AdapterRounds):
    """Flower's FedYogi: a Yogi step on the pseudo-gradient ``aggregate − global``."""


class AdapterFedAdagrad(_KeepDtypes, FedAdagrad, AdapterRounds):
    """Flower's FedAdagrad: an Adagrad step on the pseudo-gradient ``aggregate − global``."""


class AdapterFedAvgM(_KeepDtypes, FedAvgM, AdapterRounds):
    """Flower's FedAvgM: server momentum on the pseudo-gradient ``global − aggregate``."""


def make_strategy(
    server: ServerStrategy,
    on_client_report: Callable[[int, ClientReport], None],
    rule: AggregationRule | None = None,
    settings: RoundSettings | None = None,
    **flower: Any,
) -> AdapterRounds:
    """The strategy ``server`` names, with Offsite's rule and guards under it.

    ``flower`` holds Flower's sampling keywords (``fraction_train``, ``min_train_nodes``, ...).
    """
    flower = {"weighted_by_key": NUM_EXAMPLES, **flower}
    lr = server.learning_rate
    strategy: AdapterRounds
    if server.name == "fedavg":
        strategy = AdapterRounds(**flower)
    elif server.name == "fedprox":
        strategy = AdapterFedProx(proximal_mu=server.proximal_mu, **flower)
    elif server.name == "fedadam":
        strategy = AdapterFedAdam(
            eta=lr, beta_1=server.beta1, beta_2=server.beta2, tau=server.tau, **flower
        )
    elif server.name == "fedyogi":
        strategy = AdapterFedYogi(
            eta=lr, beta_1=server.beta1, beta_2=server.beta2, tau=server.tau, **flower
        )
    elif server.name == "fedadagrad":
        strategy = AdapterFedAdagrad(eta=lr, tau=server.tau, **flower)
    elif server.name == "fedavgm":
        strategy = AdapterFedAvgM(
            server_learning_rate=lr, server_momentum=server.momentum, **flower
        )
    else:
        raise ValueError(f"unknown server strategy {server.name!r}")
    strategy.setup(on_client_report, rule, settings)
    return strategy


@dataclass
class _Round:
    """What ``aggregate_train`` keeps while one round's replies stream in (no tensors but the
    running aggregate inside ``into``)."""

    number: int
    sent: dict[str, int]  # this round's instruction ids → the node each was sent to
    global_state: dict[str, torch.Tensor] | None
    into: Collector | None
    masked_size: int | None  # secure rounds: each masked vector's length but the weight
    reports: dict[str, ClientReport] = field(default_factory=dict)
    metrics: dict[str, RecordDict] = field(default_factory=dict)  # of the usable replies
    stale_nodes: set[str] = field(default_factory=set)
    folded_secure: int = 0


def _release(reply: Message) -> None:
    """Drop a folded reply's tensors now. Flower's ``RecordDict`` is a reference cycle (its
    child records hold a bound method of it), so without this every reply's arrays would live
    until the garbage collector's next pass: measured, ~10 replies' worth held at a time.
    (Flower's own FedTrimmedAvg and FedMedian pop arrays out of the replies they aggregate.)"""
    if not reply.has_error():
        for record in reply.content.array_records.values():
            record.clear()


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
    global_state: Mapping[str, torch.Tensor] | None,
) -> ClientUpdate | str:
    """The reply as an update (a sparse upload rebuilt against the global adapter), or why it
    cannot be one."""
    try:
        arrays = reply.content.array_records[arrays_key]
        state: Mapping[str, torch.Tensor] = arrays.to_torch_state_dict()
        metrics = next(iter(reply.content.metric_records.values()))
        sent = TrainReply.from_record(metrics)
        if sent.sparse_upload and global_state is not None:
            state = decode_update(state, global_state)
    except (KeyError, StopIteration, TypeError, ValueError, RuntimeError) as err:
        return f"malformed reply: {err!r}"
    return ClientUpdate(node, state, sent.num_examples)
