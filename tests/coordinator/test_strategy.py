"""The server strategy on real Flower messages: dead clients, quorum, duplicates, DP rounds."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, Error, Message, Metadata, RecordDict

from coordinator.federation.strategy import AdapterFedAvg, RoundSettings
from offsite.federation.dp import DpSchedule, epsilon
from offsite.federation.robust import AggregationRule
from offsite.wire.messages import TrainReply

NAMES = {"l.lora_A.weight": (32, 64), "l.lora_B.weight": (64, 32)}


def _metadata(
    node: int, reply_to: str = "instruction", src: int | None = None, dst: int = 0
) -> Metadata:
    return Metadata(
        run_id=1,
        message_id=f"m{node}-{time.monotonic_ns()}",
        src_node_id=node if src is None else src,
        dst_node_id=dst,
        reply_to_message_id=reply_to,
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type="train",
    )


def _reply(
    node: int, state: dict[str, torch.Tensor], examples: int, reply_to: str = "instruction"
) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord(state),
            "metrics": TrainReply(
                num_examples=examples, partition_id=node, train_loss=1.0
            ).to_record(),
        }
    )
    return Message(content=content, metadata=_metadata(node, reply_to))


def _dead(node: int) -> Message:
    return Message(error=Error(code=1, reason="client process died"), metadata=_metadata(node))


def _global() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=gen) for k, s in NAMES.items()}


def _states(n: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    base = _global()
    return [
        {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
        for _ in range(n)
    ]


def _strategy(
    rule: AggregationRule | None = None, **settings: Any
) -> tuple[AdapterFedAvg, list[dict[str, Any]]]:
    reports: list[dict[str, Any]] = []
    strategy = AdapterFedAvg(
        lambda _round, report: reports.append(report), rule, RoundSettings(**settings)
    )
    strategy._global = ArrayRecord(_global())  # what configure_train would have sent
    return strategy, reports


def _send(strategy: AdapterFedAvg, nodes: tuple[int, ...]) -> dict[int, str]:
    """What configure_train would have sent this round: one instruction per node; returns
    each node's instruction id."""
    strategy._sent = [
        Message(content=RecordDict(), metadata=_metadata(0, "", src=0, dst=node)) for node in nodes
    ]
    return {m.metadata.dst_node_id: m.metadata.message_id for m in strategy._sent}


def test_three_of_ten_dead_clients_aggregate_equals_fedavg_of_survivors() -> None:
    states = _states(10)
    examples = [20 + 7 * i for i in range(10)]
    replies = [_dead(i) if i in (2, 5, 7) else _reply(i, states[i], examples[i]) for i in range(10)]
    strategy, reports = _strategy(min_replies=7)
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    result = arrays.to_torch_state_dict()
    survivors = [i for i in range(10) if i not in (2, 5, 7)]
    total = sum(examples[i] for i in survivors)
    for name in NAMES:
        expected = sum(states[i][name] * examples[i] for i in survivors) / total
        torch.testing.assert_close(result[name], expected, rtol=0, atol=1e-6)
    assert sum("error" in r for r in reports) == 3
    assert strategy.round_log[-1]["outcome"] == "aggregated 7 updates"


def test_below_quorum_the_round_fails_and_the_global_stays() -> None:
    states = _states(4)
    replies = [_dead(0), _dead(1), _reply(2, states[2], 10), _reply(3, states[3], 10)]
    strategy, _ = _strategy(min_replies=3)
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is None and metrics is None  # Flower keeps the previous global
    assert "quorum is 3" in strategy.round_log[-1]["outcome"]


def test_duplicate_and_malformed_replies_are_quarantined() -> None:
    """A second reply of one node is refused (the first, already folded into the running sum,
    counts: Flower's SuperLink itself stores one reply per instruction)."""
    states = _states(3)
    bad_shape = {"l.lora_A.weight": torch.zeros(2, 2), "l.lora_B.weight": torch.zeros(64, 32)}
    replies = [
        _reply(1, states[0], 10),
        _reply(1, states[1], 10),  # the same node again
        _reply(2, states[2], 10),
        _reply(3, bad_shape, 10),
    ]
    strategy, reports = _strategy()
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    quarantined = [r for r in reports if "quarantined" in r]
    assert {r["node-id"] for r in quarantined} == {1, 3}
    assert any("more than one reply" in r["quarantined"] for r in quarantined)
    assert any("shape" in r["quarantined"] for r in quarantined)
    expected = (states[0]["l.lora_A.weight"] + states[2]["l.lora_A.weight"]) / 2
    torch.testing.assert_close(arrays.to_torch_state_dict()["l.lora_A.weight"], expected)
    assert strategy.round_log[-1]["outcome"] == "aggregated 2 updates"


def test_dp_rounds_add_calibrated_noise_and_stop_at_the_budget() -> None:
    sigma, clip = 2.0, 0.5
    budget = epsilon(sigma, 1.0, 2, 1e-5)  # exactly two rounds fit
    dp = DpSchedule(sigma, 1.0, 2, 1e-5, budget, clip)
    states = _states(4)
    strategy, _ = _strategy(dp=dp, rule=AggregationRule())
    means = []
    for server_round in (1, 2):
        arrays, _ = strategy.aggregate_train(
            server_round, [_reply(i, states[i], 10 + 100 * i) for i in range(4)]
        )
        assert arrays is not None
        means.append(arrays.to_torch_state_dict())
        assert strategy.round_log[-1]["epsilon"] == pytest.approx(
            epsilon(sigma, 1.0, server_round, 1e-5)
        )
    # noise present, of the calibrated size around the *unweighted* mean (DP-FedAvg)
    plain = {k: sum(s[k] for s in states) / 4 for k in NAMES}
    noise = torch.cat([(means[0][k] - plain[k]).reshape(-1) for k in NAMES])
    assert float(noise.std()) == pytest.approx(sigma * clip / 4, rel=0.05)
    arrays, _ = strategy.aggregate_train(3, [_reply(i, states[i], 10) for i in range(4)])
    assert arrays is None and strategy.round_log[-1]["outcome"].startswith("stopped")


def test_stale_replies_are_rejected_and_silent_clients_recorded() -> None:
    states = _states(3)
    strategy, reports = _strategy()
    ids = _send(strategy, (1, 2, 3))
    replies = [
        _reply(1, states[0], 10, reply_to=ids[1]),
        _reply(2, states[1], 10, reply_to="a-message-of-an-earlier-round"),
    ]
    arrays, _ = strategy.aggregate_train(2, replies)
    assert arrays is not None
    by_node = {r["node-id"]: r for r in reports}
    assert by_node[2]["quarantined"] == "stale reply"
    assert "no reply before the round deadline" in by_node[3]["error"]
    torch.testing.assert_close(
        arrays.to_torch_state_dict()["l.lora_B.weight"], states[0]["l.lora_B.weight"]
    )


def test_the_superlinks_error_replies_are_put_on_the_node_they_answer_for() -> None:
    """The SuperLink answers for an unreachable node with its own id (1) as the sender: each
    such reply belongs to the node its instruction went to, not to node 1, and is not a
    duplicate of another unreachable node's."""
    states = _states(1)
    strategy, reports = _strategy()
    ids = _send(strategy, (11, 12, 13))
    unavailable = [
        Message(
            error=Error(code=3, reason="Node Unavailable"),
            metadata=_metadata(1, reply_to=ids[node], src=1),
        )
        for node in (11, 12)
    ]
    arrays, _ = strategy.aggregate_train(1, [*unavailable, _reply(13, states[0], 10, ids[13])])
    assert arrays is not None
    by_node = {r["node-id"]: r for r in reports}
    assert sorted(by_node) == [11, 12, 13], reports
    assert by_node[11]["error"] == by_node[12]["error"] == "Node Unavailable"
    assert not any("quarantined" in r for r in reports)


def test_under_lora_fa_dp_noise_leaves_the_frozen_a_exact_and_noises_b() -> None:
    """lora-fa clients never change A (it is the shared seeded start): noising it would only
    add error, and the privacy guarantee needs noise on what the data moved (B) alone; a node
    that moves A anyway moves nothing (A stays the global one, not an unnoised average)."""
    from offsite.policies import POLICIES

    sigma, clip = 2.0, 0.5
    dp = DpSchedule(sigma, 1.0, 3, 1e-5, epsilon(sigma, 1.0, 3, 1e-5), clip)
    start = _global()
    states = [{**s, "l.lora_A.weight": start["l.lora_A.weight"]} for s in _states(4)]
    states[0]["l.lora_A.weight"] = start["l.lora_A.weight"] + 1.0  # a node moved A anyway
    strategy, _ = _strategy(dp=dp, rule=AggregationRule(), frozen=POLICIES["lora-fa"].frozen)
    arrays, _ = strategy.aggregate_train(1, [_reply(i, states[i], 10) for i in range(4)])
    assert arrays is not None
    mean = arrays.to_torch_state_dict()
    torch.testing.assert_close(mean["l.lora_A.weight"], start["l.lora_A.weight"], rtol=0, atol=0)
    plain = sum(s["l.lora_B.weight"] for s in states) / 4
    noise = (mean["l.lora_B.weight"] - plain).reshape(-1)
    assert float(noise.std()) == pytest.approx(sigma * clip / 4, rel=0.1)
