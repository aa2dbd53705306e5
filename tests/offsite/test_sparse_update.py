"""Sparse upload: only changes travel, top-k with error feedback loses nothing, decode is strict."""

from __future__ import annotations

import math

import pytest
import torch

from coordinator.federation.aggregation import ClientUpdate, aggregate
from offsite.federation.robust import AggregationRule
from offsite.federation.sparse_update import decode_update, encode_update, is_sparse


def _states(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    start = {
        "a.weight": torch.randn(16, 8, generator=generator),
        "a.bias": torch.randn(16, generator=generator),
        "b.weight": torch.randn(4, 4, generator=generator),
    }
    trained = {k: v.clone() for k, v in start.items()}
    trained["a.weight"] += 0.1 * torch.randn(16, 8, generator=generator)
    trained["a.bias"] += 0.1 * torch.randn(16, generator=generator)
    return start, trained  # b.weight unchanged


def test_only_changed_tensors_are_sent_and_rebuilt_exactly() -> None:
    start, trained = _states()
    arrays, residual, stats = encode_update(trained, start)
    assert set(arrays) == {"delta/a.weight", "delta/a.bias"} and residual == {}
    assert is_sparse(arrays) and stats.tensors_sent == 2 and stats.tensors_total == 3
    rebuilt = decode_update(arrays, start)
    for name in start:
        torch.testing.assert_close(rebuilt[name], trained[name], rtol=0, atol=1e-6)


def test_top_k_sends_the_largest_entries_and_keeps_the_rest() -> None:
    start, trained = _states()
    arrays, residual, stats = encode_update(trained, start, fraction=0.25)
    change = (trained["a.weight"] - start["a.weight"]).reshape(-1)
    index = arrays["index/a.weight"]
    assert index.numel() == math.ceil(0.25 * 128) and stats.values_sent == 32 + 4
    assert set(index.tolist()) == set(change.abs().topk(32).indices.tolist())
    # sent + kept = the whole change, entry for entry
    rebuilt = decode_update(arrays, start)["a.weight"] - start["a.weight"]
    torch.testing.assert_close(rebuilt + residual["a.weight"], change.reshape(16, 8))
    assert stats.bytes_sent == 36 * 12


def test_error_feedback_delivers_everything_over_rounds() -> None:
    """A constant change sent at 10 % per round arrives in full; no entry is lost."""
    start, trained = _states(1)
    residual: dict[str, torch.Tensor] = {}
    delivered = {k: torch.zeros_like(v) for k, v in start.items()}
    rounds = 12
    for _ in range(rounds):
        arrays, residual, _ = encode_update(trained, start, 0.1, residual)
        for name, value in decode_update(arrays, start).items():
            delivered[name] += value - start[name]
    for name in start:
        expected = rounds * (trained[name] - start[name])
        torch.testing.assert_close(delivered[name] + residual.get(name, 0), expected)
    # and the residual stays bounded (the entries left behind catch up)
    assert all(r.abs().max() < 2.5 for r in residual.values())


def test_fedavg_over_sparse_uploads_equals_fedavg_over_dense() -> None:
    start, _ = _states()
    clients = []
    for seed in range(3):
        _, trained = _states(seed + 10)
        trained = {k: start[k] + (v - _states(seed + 10)[0][k]) for k, v in trained.items()}
        clients.append(trained)
    rule = AggregationRule()
    dense = aggregate(start, [ClientUpdate(str(i), s, 10 + i) for i, s in enumerate(clients)], rule)
    decoded = [decode_update(encode_update(s, start)[0], start) for s in clients]
    sparse = aggregate(
        start, [ClientUpdate(str(i), s, 10 + i) for i, s in enumerate(decoded)], rule
    )
    for name in start:
        torch.testing.assert_close(sparse.state[name], dense.state[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("arrays", "fragment"),
    [
        ({"delta/nope": torch.zeros(2)}, "not a global adapter tensor"),
        ({"delta/a.bias": torch.zeros(3)}, "shape"),
        ({"index/a.bias": torch.tensor([0, 99])}, "no value/a.bias"),
        ({"index/a.bias": torch.tensor([0, 99]), "value/a.bias": torch.ones(2)}, "outside"),
        ({"index/a.bias": torch.tensor([-1]), "value/a.bias": torch.ones(1)}, "outside"),
        ({"index/a.bias": torch.tensor([3, 3]), "value/a.bias": torch.ones(2)}, "increasing"),
        ({"index/a.bias": torch.tensor([1.0]), "value/a.bias": torch.ones(1)}, "int64"),
        ({"index/a.bias": torch.tensor([1]), "value/a.bias": torch.ones(2)}, "one value"),
        ({"value/a.bias": torch.ones(2)}, "no index/a.bias"),
        ({"weird/a.bias": torch.ones(2)}, "unknown entry"),
        (
            {
                "delta/a.bias": torch.zeros(16),
                "index/a.bias": torch.tensor([1]),
                "value/a.bias": torch.ones(1),
            },
            "both dense",
        ),
    ],
)
def test_malformed_sparse_uploads_are_refused(arrays: dict, fragment: str) -> None:
    start, _ = _states()
    with pytest.raises(ValueError, match=fragment):
        decode_update(arrays, start)


def test_fraction_must_be_a_share() -> None:
    start, trained = _states()
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="fraction"):
            encode_update(trained, start, bad)
