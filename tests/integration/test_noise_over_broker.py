"""Released noise over the real broker, through the real sidecar process: the spread
of many released windows around their true values matches the configured scale.

DKW goodness of fit against the exact discrete CDF, and the sums' standard deviation
against the planned one. Each DKW assertion fails a correct system with probability at most
1e-6 and each sd check with at most 1e-8 (the Chernoff bounds of tests/stats.py, computed in
the test), so this module's false-failure probability is below 1e-5. At 600 windows the DKW
test alone barely detects noise at half or twice the scale; the sd check misses that with
probability below 1e-8.
"""

from __future__ import annotations

import pytest

from sealedsum.consumers.client import Consumer
from sealedsum.producers.client import Producer
from tests.integration.test_end_to_end import _take
from sealedsum.common import privacy
from tests.stats import dkw_threshold, noise_cdf, sd_above, sd_below, sd_check_failure, sup_distance

pytestmark = pytest.mark.integration
ALPHA = 1e-6
WINDOWS = 600
SD_RANGE = (0.7, 1.4)  # released sd / planned sd; a factor 2 either way is outside it


@pytest.mark.slow
@pytest.mark.parametrize("mechanism", ["laplace", "gaussian"])
def test_noise_spread_over_many_released_windows(sidecar_factory, mechanism):
    stream = {"dimension": 1, "lower": 0.0, "upper": 10.0, "window_records": 2, "min_batch": 2,
              "mechanism": mechanism, "epsilon": 1.0, "budget_epsilon": 1e6}
    if mechanism == "gaussian":
        stream.update(delta=1e-6, budget_delta=1e-5)
    sc = sidecar_factory({"s": stream})
    values = [3.25, 6.5]
    true_fixed = round(sum(values) * 2**16)
    with Consumer(sc.config, "s") as consumer:
        plan = consumer.enclave.policy.streams["s"].noise_plan()
        with Producer(sc.config) as producer:
            for _ in range(WINDOWS):
                for v in values:
                    producer.send("s", [v])
        releases = _take(consumer, WINDOWS, timeout=60)
    assert sorted(r.window for r in releases) == list(range(1, WINDOWS + 1))
    threshold = dkw_threshold(WINDOWS, ALPHA)
    assert sup_distance([r.sum_fixed[0] - true_fixed for r in releases], noise_cdf(mechanism, plan.sum_scale)) < threshold
    assert sup_distance([r.count - 2 for r in releases], noise_cdf(mechanism, plan.count_scale)) < threshold
    # The spread: at scales >= 1e4 units the discrete noise has the continuous one's moments.
    assert plan.sum_scale >= 1e4 and sd_check_failure(mechanism, WINDOWS, *SD_RANGE) < 1e-8
    assert sd_below(mechanism, WINDOWS, SD_RANGE[1] / 2) < 1e-8 and sd_above(mechanism, WINDOWS, 2 * SD_RANGE[0]) < 1e-8
    residuals = [r.sum_fixed[0] - true_fixed for r in releases]
    mean = sum(residuals) / WINDOWS
    sd = (sum((x - mean) ** 2 for x in residuals) / WINDOWS) ** 0.5
    assert SD_RANGE[0] < sd / privacy.noise_std(mechanism, plan.sum_scale) < SD_RANGE[1], (sd, plan.sum_scale)
    # Released sums are the noised fixed-point totals, decoded: nothing else changed them.
    assert all(r.sum[0] == r.sum_fixed[0] / 2**16 for r in releases)
