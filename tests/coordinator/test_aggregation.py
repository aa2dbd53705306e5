"""Aggregation rules and their guards, on synthetic adapter updates."""

from __future__ import annotations

import pytest
import torch

from coordinator.federation.aggregation import ClientUpdate, aggregate, lora_product_error
from offsite.federation.robust import AggregationRule, rule_problems

SHAPES = {"a.lora_A.weight": (4, 16), "a.lora_B.weight": (16, 4), "b.bias": (7,)}


def _global() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}


def _clients(n: int, direction: dict[str, torch.Tensor], noise: float = 0.05, seed: int = 1):
    base = _global()
    gen = torch.Generator().manual_seed(seed)
    return [
        ClientUpdate(
            f"node-{i}",
            {
                k: base[k] + direction[k] + noise * torch.randn(v.shape, generator=gen)
                for k, v in base.items()
            },
            100 + 10 * i,
        )
        for i in range(n)
    ]


def _direction() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(9)
    return {k: 0.5 * torch.randn(s, generator=gen) for k, s in SHAPES.items()}


def _distance(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> float:
    return float(sum((state[k] - target[k]).pow(2).sum() for k in state).sqrt())


def test_fedavg_is_the_example_weighted_mean() -> None:
    updates = _clients(5, _direction())
    result = aggregate(_global(), updates, AggregationRule())
    total = sum(u.num_examples for u in updates)
    for name in SHAPES:
        expected = sum(u.state[name] * u.num_examples for u in updates) / total
        torch.testing.assert_close(result.state[name], expected, rtol=0, atol=1e-6)
    assert result.accepted == [u.node for u in updates] and not result.quarantined


@pytest.mark.parametrize("attack", ["scaled", "sign-flipped"])
@pytest.mark.parametrize(
    "rule",
    [
        AggregationRule("trimmed-mean", trim_fraction=0.2),
        AggregationRule("krum", byzantine=2),
        AggregationRule("multi-krum", byzantine=2),
    ],
    ids=lambda r: r.name,
)
def test_two_of_ten_attackers_barely_move_robust_rules(attack: str, rule: AggregationRule) -> None:
    direction = _direction()
    base = _global()
    updates = _clients(10, direction)
    honest_target = {k: base[k] + direction[k] for k in base}
    for attacker in updates[:2]:
        factor = 50.0 if attack == "scaled" else -10.0
        attacker.state = {k: base[k] + factor * (v - base[k]) for k, v in attacker.state.items()}
    step = _distance(honest_target, base)
    robust = _distance(aggregate(base, updates, rule).state, honest_target)
    plain = _distance(aggregate(base, updates, AggregationRule()).state, honest_target)
    assert robust < 0.1 * step, (robust, step)
    assert plain > step, (plain, step)  # FedAvg is visibly damaged


def test_krum_selects_honest_clients() -> None:
    base = _global()
    updates = _clients(7, _direction())
    for attacker in updates[:2]:
        attacker.state = {k: base[k] - 20 * (v - base[k]) for k, v in attacker.state.items()}
    result = aggregate(base, updates, AggregationRule("multi-krum", byzantine=2))
    # Flower's MultiKrum keeps n - f = 5 updates, the honest ones, and weights them by examples
    honest = updates[2:]
    total = sum(u.num_examples for u in honest)
    for name in SHAPES:
        expected = sum(u.state[name] * u.num_examples for u in honest) / total
        torch.testing.assert_close(result.state[name], expected, rtol=0, atol=1e-6)


def test_preconditions_are_checked_at_configuration_time() -> None:
    assert rule_problems(AggregationRule("krum", byzantine=1), 4)  # needs n >= 5
    assert not rule_problems(AggregationRule("krum", byzantine=1), 5)
    assert rule_problems(AggregationRule("trimmed-mean", trim_fraction=0.5), 10)
    assert rule_problems(AggregationRule("trimmed-mean", trim_fraction=0.4), 2) == []
    assert rule_problems(AggregationRule("geometric-median"), 10)  # unknown
    assert not rule_problems(AggregationRule("median"), 10)
    assert rule_problems(AggregationRule("bulyan", byzantine=1), 6)  # needs n >= 4f + 3
    assert not rule_problems(AggregationRule("bulyan", byzantine=1), 7)
    # robust rules hold every update: bounded; fedavg streams and is not
    assert "max_buffered" in rule_problems(AggregationRule("median", max_buffered=50), 51)[0]
    assert not rule_problems(AggregationRule(max_buffered=50), 1000)
    assert rule_problems(AggregationRule("multi-krum", byzantine=1, krum_select=9), 9)


def test_malformed_updates_are_quarantined_with_a_reason() -> None:
    updates = _clients(4, _direction())
    updates[0].state = {**updates[0].state, "a.lora_A.weight": torch.zeros(3, 3)}
    updates[1].state = {**updates[1].state, "b.bias": torch.full((7,), float("nan"))}
    updates[2].state = {k: v for k, v in updates[2].state.items() if k != "b.bias"}
    result = aggregate(_global(), updates, AggregationRule())
    assert result.accepted == ["node-3"]
    assert "shape" in result.quarantined["node-0"]
    assert "non-finite" in result.quarantined["node-1"]
    assert "missing" in result.quarantined["node-2"]
    for name in SHAPES:
        torch.testing.assert_close(result.state[name], updates[3].state[name])
    with pytest.raises(ValueError, match="no usable client update"):
        aggregate(_global(), updates[:3], AggregationRule())


def test_norm_bound_and_example_cap_limit_one_client() -> None:
    base = _global()
    updates = _clients(4, _direction())
    loud = updates[0]
    loud.state = {k: base[k] + 1000 * (v - base[k]) for k, v in loud.state.items()}
    loud.num_examples = 10**9
    rule = AggregationRule(max_update_norm=10.0, max_examples=200)
    result = aggregate(base, updates, rule)
    assert result.clipped == ["node-0"]
    target = {k: base[k] + _direction()[k] for k in base}
    unguarded = aggregate(base, updates, AggregationRule())
    assert _distance(result.state, target) < 0.5 * _distance(unguarded.state, target)
    # the aggregate moved at most the bound (a convex combination of bounded updates)
    assert _distance(result.state, base) <= 10.0 + 1e-6


def test_the_lora_product_error_is_measured_against_a_central_mean_of_products() -> None:
    """FedAvg of the factors vs the mean of B·A, computed here by hand for two modules."""
    gen = torch.Generator().manual_seed(3)
    names = ("x.lora_A.default.weight", "x.lora_B.default.weight")
    others = ("y.lora_A.default.weight", "y.lora_B.default.weight")
    shapes = {names[0]: (2, 5), names[1]: (6, 2), others[0]: (2, 3), others[1]: (4, 2)}
    states = [{k: torch.randn(s, generator=gen) for k, s in shapes.items()} for _ in range(3)]
    weights = [1.0, 2.0, 5.0]
    share = [w / sum(weights) for w in weights]
    difference = exact = 0.0
    for a_name, b_name in (names, others):
        products = sum(w * (s[b_name] @ s[a_name]) for w, s in zip(share, states, strict=True))
        mean_a = sum(w * s[a_name] for w, s in zip(share, states, strict=True))
        mean_b = sum(w * s[b_name] for w, s in zip(share, states, strict=True))
        difference += float((mean_b @ mean_a - products).pow(2).sum())
        exact += float(products.pow(2).sum())
    expected = (difference / exact) ** 0.5
    assert lora_product_error(states, weights) == pytest.approx(expected, rel=1e-6)
    assert expected > 0.1  # independent factors: naive averaging is far off
    # one client, or a shared A (FFA-LoRA), makes naive averaging exact
    assert lora_product_error(states[:1], [1.0]) == pytest.approx(0.0, abs=1e-12)
    shared = [{**s, names[0]: states[0][names[0]], others[0]: states[0][others[0]]} for s in states]
    assert lora_product_error(shared, weights) == pytest.approx(0.0, abs=1e-12)
    assert lora_product_error([{"b.bias": torch.ones(3)}], [1.0]) is None


def test_fedavg_reports_its_lora_product_error_and_robust_rules_do_not() -> None:
    clients = _clients(4, {k: torch.zeros(s) for k, s in SHAPES.items()}, noise=0.3)
    fedavg = aggregate(_global(), clients, AggregationRule())
    assert fedavg.lora_product_error is not None and fedavg.lora_product_error > 0
    trimmed = aggregate(_global(), clients, AggregationRule("trimmed-mean", trim_fraction=0.25))
    assert trimmed.lora_product_error is None


@pytest.mark.parametrize(("survivors", "select"), [(1, 0), (2, 0), (3, 5)])
def test_multi_krum_survives_a_round_with_fewer_clients_than_configured(
    survivors: int, select: int
) -> None:
    """Dropouts can leave n <= f (or n < krum_select) updates in a round; multi-Krum then
    averages what it can select instead of crashing the ServerApp."""
    base = {"w": torch.zeros(4)}
    updates = [ClientUpdate(str(i), {"w": torch.full((4,), float(i))}, 5) for i in range(survivors)]
    rule = AggregationRule("multi-krum", byzantine=2, krum_select=select)
    result = aggregate(base, updates, rule)
    assert result.accepted == [str(i) for i in range(survivors)]
    assert torch.isfinite(result.state["w"]).all()
    if survivors == 1:
        assert torch.equal(result.state["w"], updates[0].state["w"])
