"""Privacy arithmetic, exactly as the design page states it.

Sensitivities are in fixed-point units (values multiplied by 2**fraction_bits and
rounded). A release spends ``epsilon`` (Laplace) or ``rho`` (Gaussian, zCDP) in total,
split between the sum and the count by ``count_share``; both halves compose by
simple addition, so the pair is (epsilon)-DP or rho-zCDP as a whole.

- Laplace: scale b = Δ1/ε.
- Gaussian: ρ = Δ2²/(2σ²), so σ = Δ2/sqrt(2ρ); (ε, δ) and ρ are related by
  ε = ρ + 2·sqrt(ρ·ln(1/δ)), which we solve for ρ given the configured (ε, δ).
- Counts have sensitivity 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LAPLACE = "laplace"
GAUSSIAN = "gaussian"
MECHANISMS = (LAPLACE, GAUSSIAN)


def rho_from_epsilon_delta(epsilon: float, delta: float) -> float:
    """The largest ρ whose zCDP guarantee implies (ε, δ)-DP by ε = ρ + 2·sqrt(ρ·ln(1/δ))."""
    if epsilon <= 0 or not 0 < delta < 1:
        raise ValueError("need epsilon > 0 and 0 < delta < 1")
    log_term = math.log(1 / delta)
    return (math.sqrt(log_term + epsilon) - math.sqrt(log_term)) ** 2


def epsilon_from_rho_delta(rho: float, delta: float) -> float:
    """The ε of (ε, δ)-DP implied by ρ-zCDP."""
    if rho < 0 or not 0 < delta < 1:
        raise ValueError("need rho >= 0 and 0 < delta < 1")
    return rho + 2 * math.sqrt(rho * math.log(1 / delta))


def fixed_bound(lower: float, upper: float, fraction_bits: int) -> int:
    """Largest |encoded value| a clipped value can take, in fixed-point units."""
    scale = 1 << fraction_bits
    return max(abs(round(lower * scale)), abs(round(upper * scale)))


def sensitivity_l1(bounds: list[int]) -> int:
    """L1 sensitivity of a sum under add/remove of one record: Σ max(|l|, |u|)."""
    return sum(bounds)


def sensitivity_l2(bounds: list[int]) -> float:
    """L2 sensitivity of a sum under add/remove of one record: sqrt(Σ max(|l|, |u|)²)."""
    return math.sqrt(sum(b * b for b in bounds))


@dataclass(frozen=True, slots=True)
class NoisePlan:
    """What one release of a stream adds and spends. Scales are in fixed-point units
    for the sum and in records for the count."""

    mechanism: str
    sum_scale: float
    count_scale: float
    sensitivity_l1: int
    sensitivity_l2: float
    epsilon: float
    delta: float
    rho: float | None
    sum_share: float
    count_share: float

    @property
    def sum_budget(self) -> float:
        """The part of ε (Laplace) or ρ (Gaussian) spent on the sum."""
        return (self.epsilon if self.mechanism == LAPLACE else self.rho) * self.sum_share

    @property
    def count_budget(self) -> float:
        return (self.epsilon if self.mechanism == LAPLACE else self.rho) * self.count_share


def plan(
    mechanism: str,
    bounds: list[int],
    epsilon: float,
    delta: float,
    count_share: float,
) -> NoisePlan:
    """Calibrate both noises of one release from the declared bounds and (ε, δ)."""
    if not 0 < count_share < 1:
        raise ValueError("count_share must be strictly between 0 and 1")
    l1, l2 = sensitivity_l1(bounds), sensitivity_l2(bounds)
    sum_share = 1.0 - count_share
    if mechanism == LAPLACE:
        return NoisePlan(
            mechanism, l1 / (epsilon * sum_share), 1.0 / (epsilon * count_share),
            l1, l2, epsilon, 0.0, None, sum_share, count_share,
        )
    if mechanism == GAUSSIAN:
        rho = rho_from_epsilon_delta(epsilon, delta)
        return NoisePlan(
            mechanism, l2 / math.sqrt(2 * rho * sum_share), 1.0 / math.sqrt(2 * rho * count_share),
            l1, l2, epsilon, delta, rho, sum_share, count_share,
        )
    raise ValueError(f"unknown mechanism {mechanism!r}")


def noise_std(mechanism: str, scale: float) -> float:
    """Standard deviation of the continuous mechanism with this scale; the discrete
    samplers match it to within a fraction of one unit for scales above 1."""
    return math.sqrt(2) * scale if mechanism == LAPLACE else scale
