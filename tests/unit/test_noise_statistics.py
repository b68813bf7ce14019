"""The released noise has exactly the configured distribution.

Thousands of one-record windows go through the real enclave core (real Paillier,
real OpenDP samplers); the residuals (released minus true) of sums and counts are
compared with the exact discrete Laplace / discrete Gaussian CDF at the planned scale.
Each DKW test fails a correct implementation with probability at most 1e-6, so this
module's false-failure probability is below 1e-5.
"""

from __future__ import annotations

import math
import statistics

import pytest

from common import privacy
from tests.conftest import make_policy, make_world, now_ms, stream_table
from tests.stats import dkw_threshold, noise_cdf, sup_distance

ALPHA = 1e-6
N = 1500


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
        (signed,) = outcome.releases
        sum_residuals.append(signed.message.sum_fixed[0] - true_fixed)
        count_residuals.append(signed.message.count - 1)

    threshold = dkw_threshold(N, ALPHA)
    assert sup_distance(sum_residuals, noise_cdf(mechanism, plan.sum_scale)) < threshold
    assert sup_distance(count_residuals, noise_cdf(mechanism, plan.count_scale)) < threshold
    # The spread in value units is what the plan promises (a readable restatement of the fit).
    sd = statistics.pstdev(sum_residuals) / 2**16
    expected = privacy.noise_std(mechanism, plan.sum_scale) / 2**16
    assert 0.8 * expected < sd < 1.25 * expected
    # One decryption per release, none per record beyond that.
    assert small_keys.decryptions - decryptions_before == N


@pytest.mark.slow
def test_a_wrong_scale_would_be_caught():
    """The test above has power: noise at half or double the scale fails it."""
    import opendp.prelude as dp

    dp.enable_features("contrib")
    scale = 1000.0
    threshold = dkw_threshold(N, ALPHA)
    for actual in (scale / 2, scale * 2):
        m = dp.m.make_laplace(dp.vector_domain(dp.atom_domain(T=dp.i64)), dp.l1_distance(T=dp.i64), scale=actual)
        samples = m([0] * N)
        assert sup_distance(samples, noise_cdf("laplace", scale)) > threshold
    m = dp.m.make_laplace(dp.vector_domain(dp.atom_domain(T=dp.i64)), dp.l1_distance(T=dp.i64), scale=scale)
    assert sup_distance(m([0] * N), noise_cdf("laplace", scale)) < threshold


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
        pubs = [world.enclave.on_record(world.sealer.seal("s", [50.0]).body, now_ms()).releases[0]
                for _ in range(5)]
        draws.append([p.message.sum_fixed[0] for p in pubs])
    assert draws[0] != draws[1]
