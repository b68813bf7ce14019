"""Goodness of fit for integer noise: exact CDFs of OpenDP's discrete mechanisms and the
Dvoretzky–Kiefer–Wolfowitz bound.

DKW: for n i.i.d. samples from any distribution F (discrete included),
P(sup |F_n - F| > e) <= 2·exp(-2·n·e²). So a test that fails when the sup distance
exceeds e = sqrt(ln(2/alpha) / (2n)) fails a correct sampler with probability at most
alpha, whatever F is.
"""

from __future__ import annotations

import bisect
import functools
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



# -- the spread: tail bounds for the sample standard deviation --------------------------------
#
# For n i.i.d. draws x_i of zero-mean noise with standard deviation sd, the sample standard
# deviation s = pstdev(x) has s² = mean(x²) − mean(x)². With z = x / sd:
#   P(s >= r·sd) <= P(mean(z²) >= r²)
#   P(s <= r·sd) <= P(mean(z²) <= r² + c) + P(|mean(z)| >= sqrt(c))     for any c > 0
# and each right-hand side is bounded by Chernoff's inequality, P(mean(Y) >= a) <=
# exp(-n·(t·a − log E e^{tY})) for every t > 0 (likewise below), with the moment generating
# functions of the continuous Gaussian (z² is chi-squared with one degree of freedom) and
# Laplace (z² = E²/2 with E exponential; its upper tail is heavier than exponential, so E is
# truncated at T and P(some E_i > T) <= n·e^{-T} added). Any t gives a valid bound; a search
# only makes it tighter. The discrete mechanisms at the scales the tests use (>= 10^4 units)
# have these moments to within a relative 1e-8, far inside the slack of the bounds.

def _simpson(f, a: float, b: float, steps: int = 2000) -> float:
    h = (b - a) / steps
    total = f(a) + f(b) + sum((4 if k % 2 else 2) * f(a + k * h) for k in range(1, steps))
    return total * h / 3


def _sup(rate, lo: float, hi: float) -> float:
    """max of a concave rate(t) on (lo, hi), by golden-section search (never above the true max)."""
    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    for _ in range(60):
        c, d = b - g * (b - a), a + g * (b - a)
        if rate(c) >= rate(d):
            b = d
        else:
            a = c
    return max(rate((a + b) / 2), 0.0)


def _laplace_square_mgf_below(t: float) -> float:
    """E e^{-t·E²/2} = ∫_0^∞ e^{-x - t x²/2} dx = ½·sqrt(2π/t)·e^{1/(2t)}·erfc(1/sqrt(2t))."""
    return 0.5 * math.sqrt(2 * math.pi / t) * math.exp(1 / (2 * t)) * math.erfc(1 / math.sqrt(2 * t))


def _mean_square_below(mechanism: str, n: int, a: float) -> float:
    """Bound on P(mean(z²) <= a), a < 1."""
    if mechanism == "gaussian":
        return math.exp(-n * (a - 1 - math.log(a)) / 2)  # the chi-squared Chernoff bound in closed form
    return math.exp(-n * _sup(lambda t: -t * a - math.log(_laplace_square_mgf_below(t)), 1e-3, 50.0))


def _mean_square_above(mechanism: str, n: int, a: float) -> float:
    """Bound on P(mean(z²) >= a), a > 1."""
    if mechanism == "gaussian":
        return math.exp(-n * (a - 1 - math.log(a)) / 2)
    best = 1.0
    for T in (20.0, 30.0, 40.0):
        def rate(t, T=T):
            mgf = _simpson(lambda x: math.exp(t * x * x / 2 - x), 0.0, T) + math.exp(t * T * T / 2 - T)
            return t * a - math.log(mgf)
        best = min(best, n * math.exp(-T) + math.exp(-n * _sup(rate, 0.0, 2 / T)))
    return best


def _abs_mean_above(mechanism: str, n: int, u: float) -> float:
    """Bound on P(|mean(z)| >= u)."""
    if mechanism == "gaussian":
        return 2 * math.exp(-n * u * u / 2)
    v = u * math.sqrt(2)  # z = L / sqrt(2), L standard Laplace: E e^{tL} = 1 / (1 - t²), |t| < 1
    return 2 * math.exp(-n * _sup(lambda t: t * v + math.log(1 - t * t), 0.0, 1.0 - 1e-12))


@functools.lru_cache(maxsize=None)
def sd_below(mechanism: str, n: int, r: float) -> float:
    """An upper bound on P(pstdev of n draws <= r · the noise's standard deviation), r < 1."""
    return min(1.0, min(_mean_square_below(mechanism, n, r * r + c) + _abs_mean_above(mechanism, n, math.sqrt(c))
                        for c in ((1 - r * r) * k / 20 for k in range(1, 20))))


@functools.lru_cache(maxsize=None)
def sd_above(mechanism: str, n: int, r: float) -> float:
    """An upper bound on P(pstdev of n draws >= r · the noise's standard deviation), r > 1."""
    return min(1.0, _mean_square_above(mechanism, n, r * r))


def sd_check_failure(mechanism: str, n: int, lo: float, hi: float) -> float:
    """An upper bound on the probability that ``lo < pstdev / sd < hi`` fails for correct noise."""
    return sd_below(mechanism, n, lo) + sd_above(mechanism, n, hi)
