"""Differential privacy: the accountant against Google's dp-accounting, noise calibration,
clipping, and a budget that refuses the round that would exceed it."""

from __future__ import annotations

import math

import pytest
import torch

from offsite.federation.dp import BudgetExceeded, PrivacyAccountant, epsilon, noise_for_epsilon
from offsite.federation.dp.mechanism import (
    add_gaussian_noise,
    clip_update,
    os_generator,
    update_norm,
)


def _reference_epsilon(sigma: float, q: float, rounds: int, delta: float) -> float:
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    accountant = rdp_privacy_accountant.RdpAccountant()
    event = dp_accounting.GaussianDpEvent(sigma)
    if q < 1:
        event = dp_accounting.PoissonSampledDpEvent(q, event)
    accountant.compose(event, rounds)
    return float(accountant.get_epsilon(delta))


@pytest.mark.parametrize(
    ("sigma", "q", "rounds", "delta"),
    [
        (1.1, 0.5, 10, 1e-5),
        (2.0, 1.0, 3, 1e-5),
        (0.8, 0.1, 100, 1e-5),
        (5.0, 1.0, 50, 1e-6),
        (1.5, 0.25, 30, 1e-5),
        (3.0, 0.5, 5, 1e-5),
    ],
)
def test_epsilon_matches_dp_accounting_within_one_percent(
    sigma: float, q: float, rounds: int, delta: float
) -> None:
    ours = epsilon(sigma, q, rounds, delta)
    reference = _reference_epsilon(sigma, q, rounds, delta)
    assert ours == pytest.approx(reference, rel=0.01), (ours, reference)


def test_noise_calibration_hits_the_target() -> None:
    for target in (1.0, 4.0, 8.0):
        sigma = noise_for_epsilon(target, 1e-5, 1.0, 3)
        assert epsilon(sigma, 1.0, 3, 1e-5) <= target
        assert epsilon(sigma * 0.99, 1.0, 3, 1e-5) > target * 0.995  # not needlessly noisy
    # more privacy costs more noise
    assert noise_for_epsilon(1.0, 1e-5, 1.0, 3) > noise_for_epsilon(8.0, 1e-5, 1.0, 3)


def test_accountant_refuses_the_round_that_would_exceed_the_budget() -> None:
    sigma = noise_for_epsilon(4.0, 1e-5, 1.0, 3)
    accountant = PrivacyAccountant(sigma, 1.0, 1e-5, budget=4.0)
    spent = [accountant.spend_round() for _ in range(3)]
    assert spent == sorted(spent) and spent[-1] <= 4.0
    with pytest.raises(BudgetExceeded, match="above the budget"):
        accountant.spend_round()
    assert accountant.rounds == 3  # the refused round was not counted


def test_clipping_bounds_the_norm_and_keeps_small_updates() -> None:
    update = {"a": torch.full((10,), 3.0), "b": torch.full((6,), 4.0)}
    clipped, norm = clip_update(update, 1.0)
    assert norm == pytest.approx(math.sqrt(90 + 96))
    assert update_norm(clipped) == pytest.approx(1.0, rel=1e-6)
    # direction preserved
    torch.testing.assert_close(clipped["a"] / clipped["b"][0], update["a"] / update["b"][0])
    small, _ = clip_update({"a": torch.full((4,), 0.1)}, 1.0)
    torch.testing.assert_close(small["a"], torch.full((4,), 0.1))


def test_noise_std_is_within_three_percent_of_its_calibration() -> None:
    std = 0.37
    zero = {"w": torch.zeros(200_000)}
    noisy = add_gaussian_noise(zero, std)["w"]
    assert float(noisy.std()) == pytest.approx(std, rel=0.03)
    assert abs(float(noisy.mean())) < 5 * std / math.sqrt(noisy.numel())


def test_noise_is_seeded_by_the_os_not_reproducible() -> None:
    a = torch.randn(8, generator=os_generator())
    b = torch.randn(8, generator=os_generator())
    assert not torch.equal(a, b)
    torch.manual_seed(0)
    first = add_gaussian_noise({"w": torch.zeros(8)}, 1.0)["w"]
    torch.manual_seed(0)
    second = add_gaussian_noise({"w": torch.zeros(8)}, 1.0)["w"]
    assert not torch.equal(first, second)  # the global seed does not fix it


def test_clipping_holds_for_random_and_adversarial_updates() -> None:
    generator = torch.Generator().manual_seed(0)
    for trial in range(1000):
        scale = 10.0 ** (trial % 12 - 4)  # from 1e-4 up to 1e7
        update = {
            "a": torch.randn(7, 5, generator=generator) * scale,
            "b": torch.randn(3, generator=generator),
        }
        clipped, _ = clip_update(update, 1.5)
        assert update_norm(clipped) <= 1.5 * (1 + 1e-6)
