"""Streaming aggregation: replies fold into a running sum as they arrive, so the coordinator's
memory does not grow with the clients per round, and the result is the batch mean."""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, Message, Metadata, RecordDict
from flwr.serverapp import Grid

from coordinator.federation.aggregation import ClientUpdate, aggregate
from coordinator.federation.strategy import AdapterFedAvg
from coordinator.federation.streaming import StreamingGrid
from offsite.federation.robust import AggregationRule
from offsite.wire.messages import TrainReply

# 65,536 floats a reply; plain tensors (a LoRA pair would add the dense B·A sums that measure
# lora_product_error, constant in the clients too, but slower to build here)
SHAPES = {"l.weight": (64, 1016), "l.bias": (512,)}


def _global() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}


_GLOBAL = _global()


def _client(i: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + i % 10)
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in _GLOBAL.items()}


def _reply(node: int, reply_to: str = "") -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord(_client(node)),
            "metrics": TrainReply(num_examples=10 + node % 7, partition_id=node).to_record(),
        }
    )
    metadata = Metadata(
        run_id=1,
        message_id=f"r{node}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id=reply_to,
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type="train",
    )
    return Message(content=content, metadata=metadata)


def test_the_running_mean_equals_the_batch_mean() -> None:
    base = _global()
    updates = [ClientUpdate(str(i), _client(i), 10 + i % 7) for i in range(10)]
    result = aggregate(base, updates, AggregationRule())
    total = sum(u.num_examples for u in updates)
    for name in SHAPES:
        batch = torch.stack([u.state[name].double() * u.num_examples for u in updates]).sum(0)
        torch.testing.assert_close(result.state[name].double(), batch / total, rtol=0, atol=1e-6)


def _peak(replies: Iterable[Message]) -> int:
    strategy = AdapterFedAvg(lambda _r, _report: None)
    strategy._global = ArrayRecord(_global())
    tracemalloc.start()
    try:
        arrays, _ = strategy.aggregate_train(1, replies)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert arrays is not None
    return peak


def test_peak_memory_does_not_grow_with_the_clients_per_round() -> None:
    """tracemalloc over one round of 10 vs 100 replies of a fixed size (262 kB of arrays each)
    arriving one by one: each is folded into the running sum and released, so the peak stays
    about one reply's worth (a list of the replies, what ``Grid.send_and_receive`` returns,
    would hold them all: 26 MB at 100)."""
    one = sum(4 * torch.Size(s).numel() for s in SHAPES.values())
    streamed = {n: _peak(_reply(i) for i in range(n)) for n in (10, 100)}
    assert one < streamed[10] < 8 * one, streamed  # it traces the replies, not everything
    # 90 more replies add less than two replies' worth (measured 1.10 -> 1.36 MB: the small
    # per-client reports and metrics), where holding them would add 90
    assert streamed[100] - streamed[10] < 2 * one, streamed


class _TrickleGrid(Grid):
    """A grid whose nodes answer one per pull (and node 3 never): the real timing, no network."""

    def __init__(self) -> None:
        self.pulls = 0
        self._ids: list[str] = []

    def set_run(self, run: Any) -> None:
        raise NotImplementedError

    @property
    def run(self) -> Any:
        raise NotImplementedError

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return [1, 2, 3]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self._ids = [f"ins-{m.metadata.dst_node_id}" for m in messages]
        return list(self._ids)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulls += 1
        wanted = sorted(i for i in message_ids if i != "ins-3")
        return [_reply(int(wanted[0].split("-")[1]), wanted[0])] if wanted else []

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        raise NotImplementedError


def _instruction(node: int) -> Message:
    metadata = Metadata(
        run_id=1,
        message_id="",
        src_node_id=0,
        dst_node_id=node,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type="train",
    )
    return Message(content=RecordDict(), metadata=metadata)


def test_the_streaming_grid_yields_each_reply_as_it_is_pulled_until_the_deadline() -> None:
    inner = _TrickleGrid()
    grid = StreamingGrid(inner, pull_interval=0.01)
    replies = grid.send_and_receive([_instruction(n) for n in (1, 2, 3)], timeout=0.3)
    stream: Iterator[Message] = iter(replies)
    first = next(stream)
    assert inner.pulls == 1 and first.metadata.reply_to_message_id == "ins-1"
    start = time.monotonic()
    rest = list(stream)  # node 2 answers, node 3 never does: the deadline ends the stream
    assert [r.metadata.reply_to_message_id for r in rest] == ["ins-2"]
    assert 0.1 < time.monotonic() - start < 2.0
    assert grid.send_and_receive([], timeout=1.0) == []


def test_the_deadline_counts_from_the_push_and_a_last_pull_follows_it() -> None:
    """A caller that starts reading after the deadline (busy folding, say) gets no extra wait,
    and still the replies waiting at the deadline (one last pull: here node 1's)."""
    inner = _TrickleGrid()
    grid = StreamingGrid(inner, pull_interval=0.01)
    replies = grid.send_and_receive([_instruction(n) for n in (1, 2, 3)], timeout=0.2)
    time.sleep(0.3)
    start = time.monotonic()
    late = [r.metadata.reply_to_message_id for r in replies]
    assert time.monotonic() - start < 0.1
    assert late == ["ins-1"] and inner.pulls == 1


@pytest.mark.parametrize("rule", ["trimmed-mean", "median", "krum"])
def test_robust_rules_hold_at_most_max_buffered_updates(rule: str) -> None:
    base = _global()
    updates = [ClientUpdate(str(i), _client(i), 10) for i in range(7)]
    result = aggregate(base, updates, AggregationRule(rule, byzantine=1, max_buffered=5))
    assert result.accepted == [str(i) for i in range(5)]
    assert set(result.quarantined) == {"5", "6"}
    assert "max_buffered=5" in result.quarantined["6"]
