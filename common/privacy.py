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
from enum import StrEnum
from fractions import Fraction
from typing import Mapping


class Mechanism(StrEnum):
    """The noise a stream's releases get; the value is the policy's and the wire's spelling."""

    LAPLACE = "laplace"
    GAUSSIAN = "gaussian"


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


def l2_ball_sensitivity(l2_bound: float, fraction_bits: int, dimension: int) -> tuple[int, float]:
    """(L1, L2) sensitivity of a sum of vectors clipped to L2 norm C, in fixed point.

    Rounding each coordinate moves it by at most 1/2, so an encoded vector q has
    ‖q‖₂ <= C·2^f + sqrt(d)/2 and ‖q‖₁ <= sqrt(d)·C·2^f + d/2 (Cauchy–Schwarz).
    """
    scaled = l2_bound * (1 << fraction_bits)
    l2 = scaled + math.sqrt(dimension) / 2
    l1 = math.ceil(math.sqrt(dimension) * scaled + dimension / 2)
    return l1, l2


@dataclass(frozen=True, slots=True)
class NoisePlan:
    """What one release of a stream adds and spends. Scales are in fixed-point units
    for the sum and in records for the count. ``count_scale`` is ``None`` when the
    count is derived from the noised sums (histograms), so it costs nothing extra."""

    mechanism: Mechanism
    sum_scale: float
    count_scale: float | None
    sensitivity_l1: int
    sensitivity_l2: float
    count_sensitivity: int
    epsilon: float
    delta: float
    rho: float | None
    sum_share: float
    count_share: float

    @property
    def sum_budget(self) -> float:
        """The part of ε (Laplace) or ρ (Gaussian) spent on the sum."""
        return (self.epsilon if self.mechanism == Mechanism.LAPLACE else self.rho) * self.sum_share

    @property
    def count_budget(self) -> float:
        return (self.epsilon if self.mechanism == Mechanism.LAPLACE else self.rho) * self.count_share


def plan(
    mechanism: Mechanism,
    sensitivity_l1: int,
    sensitivity_l2: float,
    epsilon: float,
    delta: float,
    count_share: float,
    *,
    count_sensitivity: int | None = 1,
) -> NoisePlan:
    """Calibrate both noises of one release from the sensitivities and (ε, δ).

    With ``count_sensitivity=None`` the whole release budget goes to the sums and the
    count is post-processed from them (a histogram's buckets add up to its count).
    """
    if count_sensitivity is not None and not 0 < count_share < 1:
        raise ValueError("count_share must be strictly between 0 and 1")
    if count_sensitivity is None:
        count_share = 0.0
    sum_share = 1.0 - count_share
    l1, l2 = sensitivity_l1, sensitivity_l2
    k = count_sensitivity or 0
    if mechanism == Mechanism.LAPLACE:
        count_scale = k / (epsilon * count_share) if count_sensitivity else None
        return NoisePlan(mechanism, l1 / (epsilon * sum_share), count_scale, l1, l2, k,
                         epsilon, 0.0, None, sum_share, count_share)
    if mechanism == Mechanism.GAUSSIAN:
        rho = rho_from_epsilon_delta(epsilon, delta)
        count_scale = k / math.sqrt(2 * rho * count_share) if count_sensitivity else None
        return NoisePlan(mechanism, l2 / math.sqrt(2 * rho * sum_share), count_scale, l1, l2, k,
                         epsilon, delta, rho, sum_share, count_share)
    raise ValueError(f"unknown mechanism {mechanism!r}")


# ρ and the ε it implies are irrational: a Gaussian budget holds to this relative rounding.
BUDGET_TOLERANCE = 1e-9


def spent(mechanism: Mechanism, epsilon: float, delta: float, releases: int,
          budget_delta: float) -> tuple[float, float | None]:
    """Privacy spent by ``releases`` releases of one stream: ``(ε, ρ)``.

    Laplace composes purely: ε·n (ρ is ``None``). Gaussian composes in zCDP: ρ·n, and
    the ε is the one that ρ implies at the stream's ``budget_delta``.
    """
    if mechanism == Mechanism.LAPLACE:
        return float(Fraction(repr(epsilon)) * releases), None
    rho = rho_from_epsilon_delta(epsilon, delta) * releases
    return (epsilon_from_rho_delta(rho, budget_delta) if releases else 0.0), rho


def budget_allows(mechanism: Mechanism, epsilon: float, delta: float, releases: int,
                  budget_epsilon: float, budget_delta: float) -> bool:
    """Whether ``releases`` releases in total stay within (budget_epsilon, budget_delta)."""
    if mechanism == Mechanism.LAPLACE:
        # Exact decimal arithmetic: ten releases at ε = 0.1 fit a budget of 1.0.
        return Fraction(repr(epsilon)) * releases <= Fraction(repr(budget_epsilon))
    eps, _ = spent(mechanism, epsilon, delta, releases, budget_delta)
    return eps <= budget_epsilon * (1 + BUDGET_TOLERANCE)


def max_releases(mechanism: Mechanism, epsilon: float, delta: float, budget_epsilon: float,
                 budget_delta: float) -> int:
    """How many releases of one stream its budget allows in total."""
    if mechanism == Mechanism.LAPLACE:
        return int(Fraction(repr(budget_epsilon)) // Fraction(repr(epsilon)))
    n = int(rho_from_epsilon_delta(budget_epsilon, budget_delta) / rho_from_epsilon_delta(epsilon, delta))
    while budget_allows(mechanism, epsilon, delta, n + 1, budget_epsilon, budget_delta):
        n += 1
    while n > 0 and not budget_allows(mechanism, epsilon, delta, n, budget_epsilon, budget_delta):
        n -= 1
    return n


def noise_std(mechanism: Mechanism, scale: float) -> float:
    """Standard deviation of the continuous mechanism with this scale; the discrete
    samplers match it to within a fraction of one unit for scales above 1."""
    return math.sqrt(2) * scale if mechanism == Mechanism.LAPLACE else scale


# -- budget groups (docs/protocol.md section 15.6) ------------------------------------------
# Streams fed by the same data share one budget: the group's spend is the composition of
# every release of every stream in it.

@dataclass(frozen=True, slots=True)
class ReleaseCost:
    """What one release of a stream costs: its mechanism and per-release ε (and δ)."""

    mechanism: Mechanism
    epsilon: float
    delta: float = 0.0

    @property
    def zcdp_rho(self) -> float:
        """This release as ρ-zCDP: the Gaussian's ρ₁, or ε²/2 for a pure ε-DP (Laplace)
        release, which is (ε²/2)-zCDP (Bun & Steinke 2016, Proposition 1.4)."""
        if self.mechanism == Mechanism.LAPLACE:
            return self.epsilon * self.epsilon / 2
        return rho_from_epsilon_delta(self.epsilon, self.delta)


GroupReleases = Mapping[str, tuple[ReleaseCost, int]]
"""A budget group's members: stream name → (cost of one release, releases charged)."""


def _pure(members: GroupReleases) -> bool:
    return all(cost.mechanism == Mechanism.LAPLACE for cost, _ in members.values())


def group_spent(members: GroupReleases, budget_delta: float) -> tuple[float, float | None]:
    """Privacy spent by all releases of a budget group: ``(ε, ρ)``.

    All Laplace: pure composition, Σ ε_s·n_s in exact decimal (ρ is ``None``). Otherwise
    zCDP: ρ = Σ n_s·ρ_s accumulated in doubles in sorted stream-name order (each Laplace
    release converted to ε²/2), and the ε it implies at the group's ``budget_delta``.
    """
    if _pure(members):
        return float(sum((Fraction(repr(cost.epsilon)) * n for cost, n in members.values()), Fraction(0))), None
    rho = 0.0
    for name in sorted(members):
        cost, n = members[name]
        rho += n * cost.zcdp_rho
    releases = sum(n for _, n in members.values())
    return (epsilon_from_rho_delta(rho, budget_delta) if releases else 0.0), rho


def group_allows(members: GroupReleases, budget_epsilon: float, budget_delta: float) -> bool:
    """Whether the group's releases in total stay within (budget_epsilon, budget_delta)."""
    if _pure(members):
        used = sum((Fraction(repr(cost.epsilon)) * n for cost, n in members.values()), Fraction(0))
        return used <= Fraction(repr(budget_epsilon))
    eps, _ = group_spent(members, budget_delta)
    return eps <= budget_epsilon * (1 + BUDGET_TOLERANCE)


def group_remaining(members: GroupReleases, stream: str, budget_epsilon: float, budget_delta: float) -> int:
    """How many more releases of ``stream`` the group's budget allows, the other streams'
    releases staying as they are (the largest k with ``stream`` at n + k allowed)."""
    cost, n = members[stream]

    def allows(k: int) -> bool:
        return group_allows({**members, stream: (cost, n + k)}, budget_epsilon, budget_delta)

    if _pure(members):
        used = sum((Fraction(repr(c.epsilon)) * m for c, m in members.values()), Fraction(0))
        return max(int((Fraction(repr(budget_epsilon)) - used) // Fraction(repr(cost.epsilon))), 0)
    _, rho = group_spent(members, budget_delta)
    k = max(int((rho_from_epsilon_delta(budget_epsilon, budget_delta) - rho) / cost.zcdp_rho), 0)
    while allows(k + 1):
        k += 1
    while k > 0 and not allows(k):
        k -= 1
    return k
