"""Differential privacy accounting for federated rounds: Rényi DP of the sampled Gaussian.

The mechanism (DP-FedAvg, client level): every sampled client clips its update to L2 norm C; the
sum of updates gets Gaussian noise of standard deviation ``noise_multiplier × C``. One round is
one application of the Poisson-subsampled Gaussian mechanism with sampling rate q (the share of
clients sampled per round; Flower samples a fixed-size subset, which Poisson sampling
approximates).

RDP of one round at order α (Mironov, Talwar, Zhang 2019), with μ0 = N(0, σ²), μ1 = N(1, σ²)::

    A_α = E_{z~μ0}[((1 - q) + q · μ1(z)/μ0(z))^α],   RDP(α) = log(A_α) / (α - 1)

computed exactly by the binomial expansion for integer α and by numerical integration for
fractional α; for q = 1 it is α / (2σ²). Rounds compose by adding RDP; ε at δ uses the
conversion of Canonne, Kamath and Steinke (2020), as Google's ``dp-accounting`` does (the tests
compare against it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

ORDERS: tuple[float, ...] = (
    *(1 + x / 10 for x in range(1, 100)),
    *range(11, 64),
    128,
    256,
    512,
    1024,
)


def _log_add(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    high, low = max(a, b), min(a, b)
    return high + math.log1p(math.exp(low - high))


def _log_a_integer(q: float, sigma: float, alpha: int) -> float:
    total = -math.inf
    for k in range(alpha + 1):
        log_coef = math.lgamma(alpha + 1) - math.lgamma(k + 1) - math.lgamma(alpha - k + 1)
        term = (
            log_coef + k * math.log(q) + (alpha - k) * math.log1p(-q) + (k * k - k) / (2 * sigma**2)
        )
        total = _log_add(total, term)
    return total


def _log_a_fractional(q: float, sigma: float, alpha: float) -> float:
    from scipy import integrate

    # integrate in z/σ units around the bulk of μ0 and of the q·μ1 term
    def integrand(z: float) -> float:
        log_ratio = (2 * z - 1) / (2 * sigma**2)
        inner = _log_add(math.log1p(-q), math.log(q) + log_ratio)
        log_density = -(z * z) / (2 * sigma**2) - math.log(sigma * math.sqrt(2 * math.pi))
        return math.exp(log_density + alpha * inner)

    width = 40 * sigma + 40 * alpha / sigma + 10
    value, _ = integrate.quad(integrand, -width, width, points=[0.0, 0.5, 1.0], limit=500)
    return math.log(value)


def rdp_sampled_gaussian(q: float, sigma: float, alpha: float) -> float:
    """RDP at order ``alpha`` of one Poisson-sampled Gaussian step (sensitivity 1)."""
    if not 0 < q <= 1:
        raise ValueError("sampling rate must be in (0, 1]")
    if sigma <= 0:
        return math.inf
    if q == 1.0:
        return alpha / (2 * sigma**2)
    if float(alpha).is_integer():
        log_a = _log_a_integer(q, sigma, int(alpha))
    else:
        log_a = _log_a_fractional(q, sigma, alpha)
    return log_a / (alpha - 1)


def epsilon_from_rdp(
    rdp: Sequence[float], orders: Sequence[float], delta: float
) -> tuple[float, float]:
    """(ε, order achieving it) at ``delta`` from RDP values at ``orders``."""
    if not 0 < delta < 1:
        raise ValueError("delta must be in (0, 1)")
    best, best_order = math.inf, math.nan
    for value, alpha in zip(rdp, orders, strict=True):
        if alpha <= 1 or math.isinf(value):
            continue
        eps = value + math.log1p(-1 / alpha) - (math.log(delta) + math.log(alpha)) / (alpha - 1)
        if eps < best:
            best, best_order = eps, alpha
    return max(best, 0.0), best_order


def epsilon(
    noise_multiplier: float,
    sample_rate: float,
    rounds: int,
    delta: float,
    orders: Sequence[float] = ORDERS,
) -> float:
    """ε after ``rounds`` rounds of the sampled Gaussian mechanism."""
    if rounds == 0:
        return 0.0
    rdp = [rounds * rdp_sampled_gaussian(sample_rate, noise_multiplier, a) for a in orders]
    return epsilon_from_rdp(rdp, orders, delta)[0]


def noise_for_epsilon(
    target_epsilon: float, delta: float, sample_rate: float, rounds: int, tolerance: float = 1e-3
) -> float:
    """The smallest noise multiplier whose ε after ``rounds`` stays within ``target_epsilon``."""
    if target_epsilon <= 0:
        raise ValueError("target epsilon must be > 0")
    low, high = 1e-2, 1.0
    while epsilon(high, sample_rate, rounds, delta) > target_epsilon:
        low, high = high, high * 2
        if high > 1e4:
            raise ValueError(f"no noise level reaches ε={target_epsilon} in {rounds} rounds")
    while high - low > tolerance * high:
        middle = (low + high) / 2
        if epsilon(middle, sample_rate, rounds, delta) > target_epsilon:
            low = middle
        else:
            high = middle
    return high


class BudgetExceeded(RuntimeError):
    """Another round would spend more privacy than the run's budget."""


@dataclass
class PrivacyAccountant:
    """Tracks ε round by round and refuses a round that would exceed the budget."""

    noise_multiplier: float
    sample_rate: float
    delta: float
    budget: float
    rounds: int = 0

    def epsilon_after(self, rounds: int) -> float:
        return epsilon(self.noise_multiplier, self.sample_rate, rounds, self.delta)

    @property
    def spent(self) -> float:
        return self.epsilon_after(self.rounds)

    def spend_round(self) -> float:
        """Account one more round (refused if it would exceed the budget); returns ε so far."""
        next_epsilon = self.epsilon_after(self.rounds + 1)
        if next_epsilon > self.budget * (1 + 1e-9):
            raise BudgetExceeded(
                f"round {self.rounds + 1} would bring ε to {next_epsilon:.3f}, above the budget "
                f"{self.budget:g} (δ={self.delta:g}); stop here or raise the noise"
            )
        self.rounds += 1
        return next_epsilon


@dataclass(frozen=True)
class DpSchedule:
    """The noise a run uses and what it spends: resolved from the privacy settings."""

    noise_multiplier: float
    sample_rate: float
    rounds: int
    delta: float
    budget: float
    clip_norm: float

    @property
    def epsilon(self) -> float:
        return epsilon(self.noise_multiplier, self.sample_rate, self.rounds, self.delta)

    def accountant(self) -> PrivacyAccountant:
        return PrivacyAccountant(self.noise_multiplier, self.sample_rate, self.delta, self.budget)


def dp_schedule(privacy: Any, federation: Any) -> DpSchedule:
    """Resolve ``privacy`` (a PrivacyConfig) for ``federation``; ValueError if it cannot hold.

    The sampling rate is the share of clients sampled per round.
    """
    sample_rate = federation.sampled_clients / federation.num_clients
    rounds = int(federation.rounds)
    noise = privacy.noise_multiplier or noise_for_epsilon(
        privacy.epsilon, privacy.delta, sample_rate, rounds
    )
    schedule = DpSchedule(
        noise, sample_rate, rounds, privacy.delta, privacy.epsilon, privacy.clip_norm
    )
    if schedule.epsilon > privacy.epsilon * (1 + 1e-9):
        fits = 0
        while epsilon(noise, sample_rate, fits + 1, privacy.delta) <= privacy.epsilon:
            fits += 1
        raise ValueError(
            f"privacy.noise_multiplier={noise:g} spends ε={schedule.epsilon:.2f} in {rounds} "
            f"rounds, above privacy.epsilon={privacy.epsilon:g}: run at most {fits} rounds, "
            "raise the noise, or set noise_multiplier=0 to calibrate it"
        )
    return schedule
