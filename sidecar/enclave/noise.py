"""Noise from OpenDP's exact discrete samplers (discrete Laplace, discrete Gaussian).

OpenDP samples with exact integer arithmetic from the operating system's
cryptographic RNG, so it is immune to Mironov's floating-point attack. Never numpy.

Each measurement is checked against the budget it is meant to spend with OpenDP's
own privacy map before it is used: a mis-calibrated scale raises instead of leaking.
"""

from __future__ import annotations

from functools import lru_cache

import opendp.prelude as dp

from sealedsum.common.errors import CalibrationError
from sealedsum.common.privacy import Mechanism, NoisePlan

dp.enable_features("contrib")  # OpenDP gates its samplers behind this flag

# OpenDP's maps round up in the last place; a map within this factor of the target is exact.
MAP_TOLERANCE = 1e-9


@lru_cache(maxsize=256)
def _vector_measurement(mechanism: Mechanism, scale: float, d_in: float, budget: float):
    domain = dp.vector_domain(dp.atom_domain(T=dp.i64))
    if mechanism == Mechanism.LAPLACE:
        m = dp.m.make_laplace(domain, dp.l1_distance(T=dp.i64), scale=scale)
        spent = m.map(int(d_in))
    elif mechanism == Mechanism.GAUSSIAN:
        m = dp.m.make_gaussian(domain, dp.l2_distance(T=float), scale=scale)
        spent = m.map(float(d_in))
    else:
        raise ValueError(mechanism)
    if spent > budget * (1 + MAP_TOLERANCE):
        raise CalibrationError(f"{mechanism} scale {scale} spends {spent} > {budget}")
    return m


def sum_measurement(plan: NoisePlan):
    d_in = plan.sensitivity_l1 if plan.mechanism == Mechanism.LAPLACE else plan.sensitivity_l2
    return _vector_measurement(plan.mechanism, plan.sum_scale, d_in, plan.sum_budget)


def count_measurement(plan: NoisePlan):
    return _vector_measurement(plan.mechanism, plan.count_scale, plan.count_sensitivity, plan.count_budget)


def noisy_sum(plan: NoisePlan, totals: list[int]) -> list[int]:
    """The window's integer totals plus one fresh noise draw per coordinate."""
    return list(sum_measurement(plan)(totals))


def noisy_count(plan: NoisePlan, count: int) -> int:
    return count_measurement(plan)([count])[0]
