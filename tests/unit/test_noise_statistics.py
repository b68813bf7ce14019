"""The released noise has exactly the configured distribution.

Thousands of one-record windows go through the real enclave core (real Paillier,
real OpenDP samplers); the residuals (released minus true) of sums and counts are
compared with the exact discrete Laplace / discrete Gaussian CDF at the planned scale.
Each DKW test fails a correct implementation with probability at most 1e-6 and each
standard-deviation check with at most 2e-10 (Laplace; 1e-17 Gaussian: the Chernoff bounds of
tests/stats.py, computed and asserted in the test), so with 8 DKW tests and 4 checks this
module's false-failure probability is below 1e-5.
"""

from __future__ import annotations

import math
import statistics

import pytest

from sealedsum.common import privacy
from tests.conftest import make_policy, make_world, now_ms, stream_table
from tests.stats import dkw_threshold, noise_cdf, sd_above, sd_below, sd_check_failure, sup_distance

ALPHA = 1e-6
N = 1500
SD_RANGE = (0.8, 1.25)  # released sd / planned sd


@pytest.mark.slow
@pytest.mark.parametrize("mechanism, epsilon, lower, upper", [
    ("laplace", 1.0, 0.0, 100.0),
    ("laplace", 0.2, -2.0, 5.0),
    ("gaussian", 1.0, 0.0, 100.0),
    ("gaussian", 4.0, -1.0, 1.0),
])
def test_release_noise_matches_the_configured_distribution(small_keys, mechanism, epsilon, lower, upper):
    stream = stream_table(mechanism=mechanism, epsilon=epsilon, lower=lower, upper=upper,
                          window_records=1, min_batch=1, delta=1e-6 if mechanism == "gaussian" else None)
    world = make_world(small_keys, make_policy({"s": stream}))
    plan = world.enclave.policy.streams["s"].noise_plan()
    value = (lower + upper) / 2 + 0.3
    true_fixed = round(value * 2**16)
    sum_residuals, count_residuals = [], []
    decryptions_before = small_keys.decryptions
    for _ in range(N):
        outcome = world.enclave.on_record(world.sealer.seal("s", [value]).body, now_ms())
        (signed,) = outcome.publish
        sum_residuals.append(signed.message.sum_fixed[0] - true_fixed)
        count_residuals.append(signed.message.count - 1)

    threshold = dkw_threshold(N, ALPHA)
    assert sup_distance(sum_residuals, noise_cdf(mechanism, plan.sum_scale)) < threshold
    assert sup_distance(count_residuals, noise_cdf(mechanism, plan.count_scale)) < threshold
    # The spread in value units is what the plan promises (a readable restatement of the fit).
    # A correct sampler fails this with probability below 2e-10 (at scales >= 1e4 units, where
    # the discrete noise has the continuous one's moments).
    assert plan.sum_scale >= 1e4 and sd_check_failure(mechanism, N, *SD_RANGE) < 2e-10
    sd = statistics.pstdev(sum_residuals) / 2**16
    expected = privacy.noise_std(mechanism, plan.sum_scale) / 2**16
    assert SD_RANGE[0] * expected < sd < SD_RANGE[1] * expected
    # One decryption per release, none per record beyond that.
    assert small_keys.decryptions - decryptions_before == N


@pytest.mark.slow
def test_a_wrong_scale_would_be_caught():
    """The test above has power: noise at half or double the scale fails it."""
    import opendp.prelude as dp

    dp.enable_features("contrib")
    scale = 1000.0
    threshold = dkw_threshold(N, ALPHA)
    sd = privacy.noise_std("laplace", scale)
    for actual in (scale / 2, scale * 2):
        m = dp.m.make_laplace(dp.vector_domain(dp.atom_domain(T=dp.i64)), dp.l1_distance(T=dp.i64), scale=actual)
        samples = m([0] * N)
        assert sup_distance(samples, noise_cdf("laplace", scale)) > threshold
        assert not SD_RANGE[0] < statistics.pstdev(samples) / sd < SD_RANGE[1]
    # ... and the sd check misses a factor-2 error with probability below 1e-9.
    assert sd_below("laplace", N, SD_RANGE[1] / 2) < 1e-9 and sd_above("laplace", N, 2 * SD_RANGE[0]) < 1e-9
    m = dp.m.make_laplace(dp.vector_domain(dp.atom_domain(T=dp.i64)), dp.l1_distance(T=dp.i64), scale=scale)
    assert sup_distance(m([0] * N), noise_cdf("laplace", scale)) < threshold


def test_sd_bounds_hold_where_they_can_be_checked():
    """The Chernoff bounds of tests/stats.py are at least the probabilities they bound: exactly
    for Gaussian draws (a sum of n squares is chi-squared, whose CDF for even n is a Poisson
    sum; a mean is normal), and by simulation for 60 discrete Laplace draws of scale 1000 (1500
    samples of the sd; a correct bound fails that with probability below 1e-50)."""
    import opendp.prelude as dp

    from tests import stats

    def chi2_cdf(x, n):  # P(chi-squared with n (even) degrees of freedom <= x)
        return 1 - math.exp(-x / 2) * math.fsum((x / 2) ** k / math.factorial(k) for k in range(n // 2))

    for n in (2, 10, 40):
        for a in (0.3, 0.5, 0.8):
            assert 1 > stats._mean_square_below("gaussian", n, a) >= chi2_cdf(n * a, n)
        for a in (1.3, 2.0, 3.0):
            assert 1 > stats._mean_square_above("gaussian", n, a) >= 1 - chi2_cdf(n * a, n)
        for u in (0.2, 0.5):
            assert stats._abs_mean_above("gaussian", n, u) >= math.erfc(u * math.sqrt(n / 2))
    dp.enable_features("contrib")
    n, reps, scale = 60, 1500, 1000.0
    m = dp.m.make_laplace(dp.vector_domain(dp.atom_domain(T=dp.i64)), dp.l1_distance(T=dp.i64), scale=scale)
    draws = m([0] * (n * reps))
    sd = privacy.noise_std("laplace", scale)
    ratios = []
    for i in range(reps):
        x = draws[i * n:(i + 1) * n]
        mean = math.fsum(x) / n
        ratios.append(math.sqrt(max(math.fsum(v * v for v in x) / n - mean * mean, 0.0)) / sd)
    for lo, hi in ((0.75, 1.3), (0.8, 1.2)):
        # The fractions are a few percent and the bounds 0.2 to 0.7: far more than the sampling
        # error apart (about 5e-3), so a bound ten times too small fails here.
        assert sum(r <= lo for r in ratios) / reps <= sd_below("laplace", n, lo)
        assert sum(r >= hi for r in ratios) / reps <= sd_above("laplace", n, hi)


def test_gaussian_cdf_helper_is_normalised():
    cdf = noise_cdf("gaussian", 3.0)
    assert cdf(-10**6) == 0.0 and cdf(10**6) == 1.0 and math.isclose(cdf(0) - cdf(-1), 1 / (3.0 * math.sqrt(2 * math.pi)), rel_tol=1e-6)


def test_noise_does_not_come_from_a_seedable_prng(small_keys):
    """Reseeding Python's and numpy's generators identically does not repeat the noise:
    OpenDP draws from the operating system's cryptographic RNG."""
    import random

    import numpy as np

    draws = []
    for _ in range(2):
        random.seed(1234)
        np.random.seed(1234)
        world = make_world(small_keys, make_policy({"s": stream_table(window_records=1, min_batch=1)}))
        pubs = [world.enclave.on_record(world.sealer.seal("s", [50.0]).body, now_ms()).publish[0]
                for _ in range(5)]
        draws.append([p.message.sum_fixed[0] for p in pubs])
    assert draws[0] != draws[1]
