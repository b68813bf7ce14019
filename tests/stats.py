"""Goodness of fit for integer noise: exact CDFs of OpenDP's discrete mechanisms and the
Dvoretzky–Kiefer–Wolfowitz bound.

DKW: for n i.i.d. samples from any distribution F (discrete included),
P(sup |F_n - F| > e) <= 2·exp(-2·n·e²). So a test that fails when the sup distance
exceeds e = sqrt(ln(2/alpha) / (2n)) fails a correct sampler with probability at most
alpha, whatever F is.
"""

from __future__ import annotations

import bisect
import math


def dkw_threshold(n: int, alpha: float) -> float:
    return math.sqrt(math.log(2 / alpha) / (2 * n))


def discrete_laplace_cdf(scale: float):
    """P(X <= x) for P(k) ∝ exp(-|k|/scale), k integer."""
    q = math.exp(-1 / scale)

    def cdf(x: int) -> float:
        if x < 0:
            return math.exp(x / scale) / (1 + q)
        return 1 - math.exp(-(x + 1) / scale) / (1 + q)

    return cdf


def discrete_gaussian_cdf(sigma: float):
    """P(X <= x) for P(k) ∝ exp(-k²/(2σ²)); exact summation for small σ, else the
    continuity-corrected normal CDF (its error is below 1e-9 for σ >= 200)."""
    if sigma >= 200:
        return lambda x: 0.5 * (1 + math.erf((x + 0.5) / (sigma * math.sqrt(2))))
    span = int(40 * sigma) + 40
    weights = [math.exp(-k * k / (2 * sigma * sigma)) for k in range(-span, span + 1)]
    total = math.fsum(weights)
    cumulative, acc = [], 0.0
    for w in weights:
        acc += w
        cumulative.append(acc / total)

    def cdf(x: int) -> float:
        if x < -span:
            return 0.0
        if x > span:
            return 1.0
        return cumulative[x + span]

    return cdf


def sup_distance(samples: list[int], cdf) -> float:
    """sup_x |F_n(x) - F(x)| over integers, checking both sides of every jump."""
    xs = sorted(samples)
    n = len(xs)
    worst = 0.0
    for x in sorted(set(xs)):
        below = bisect.bisect_left(xs, x) / n       # F_n(x-1)
        at = bisect.bisect_right(xs, x) / n         # F_n(x)
        worst = max(worst, abs(at - cdf(x)), abs(below - cdf(x - 1)))
    return worst


def noise_cdf(mechanism: str, scale: float):
    return discrete_laplace_cdf(scale) if mechanism == "laplace" else discrete_gaussian_cdf(scale)
