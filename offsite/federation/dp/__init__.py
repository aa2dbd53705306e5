"""Differential privacy, in one place: ``accounting`` (Rényi DP of the sampled Gaussian, the
accountant and the run's schedule; no torch, so the CLI stays light) and ``mechanism`` (what a
client and the coordinator do to updates: clip, add OS-seeded Gaussian noise; torch).

The accounting names are re-exported here; import the mechanism from
``offsite.federation.dp.mechanism``.
"""

from offsite.federation.dp.accounting import (
    BudgetExceeded,
    DpSchedule,
    PrivacyAccountant,
    dp_schedule,
    epsilon,
    epsilon_from_rdp,
    noise_for_epsilon,
    rdp_sampled_gaussian,
)

__all__ = [
    "BudgetExceeded",
    "DpSchedule",
    "PrivacyAccountant",
    "dp_schedule",
    "epsilon",
    "epsilon_from_rdp",
    "noise_for_epsilon",
    "rdp_sampled_gaussian",
]
