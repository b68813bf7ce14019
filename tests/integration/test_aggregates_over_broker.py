"""Histogram, mean and vector releases over the real broker, at realistic privacy parameters
(eps = 1), from known records through a real sidecar, Producer and Consumer: the released
values are the true ones within their noise, the mean is exactly the noised sum over the
noised count, and the noise scales the results report are the ones the policy gives by hand.

Bounds on the noise: the discrete Gaussian is sub-Gaussian, P(|X| >= 8σ) <= 2·e^-32
(Canonne, Kamath and Steinke 2020), and the discrete Laplace has P(|X| >= 30b) <= 2·e^-30.
Ten such checks and one positive count (P(count <= 0) < e^-25) make this test fail a
correct system with probability below 1e-10.
"""

from __future__ import annotations

import math
import time

import pytest

from sealedsum.common.results import Release
from sealedsum.consumers.client import Consumer
from sealedsum.consumers.chain_audit import verify_chain
from sealedsum.producers.client import Producer

pytestmark = pytest.mark.integration

F = 2**16  # fraction_bits
GAUSSIAN = {"mechanism": "gaussian", "epsilon": 1.0, "delta": 1e-6, "budget_epsilon": 10.0, "budget_delta": 1e-5}
HIST_VALUES = [5.0] * 10 + [15.0] * 20 + [30.0] * 30 + [500.0] * 5  # 500 is clipped into the last bucket
MEAN_VALUES = [float(v) for v in range(10, 60)]                     # 50 values in [0, 100]
VEC_VALUES = [[0.6, 0.0, -0.8, 0.0]] * 16 + [[3.0, 4.0, 0.0, 0.0]] * 4  # norm 1, and norm 5 scaled to 1
STREAMS = {
    "h": {"kind": "histogram", "edges": [0, 10, 20, 50], "window_records": len(HIST_VALUES),
          "min_batch": len(HIST_VALUES), **GAUSSIAN},
    "m": {"kind": "mean", "dimension": 1, "lower": 0.0, "upper": 100.0, "window_records": len(MEAN_VALUES),
          "min_batch": len(MEAN_VALUES), "mechanism": "laplace", "epsilon": 1.0, "budget_epsilon": 10.0},
    "v": {"kind": "vector", "dimension": 4, "l2_bound": 1.0, "window_records": len(VEC_VALUES),
          "min_batch": len(VEC_VALUES), **GAUSSIAN},
}

# By hand. Gaussian, eps = 1 at delta = 1e-6: rho = (sqrt(ln(1e6) + 1) - sqrt(ln(1e6)))^2 = 0.017469...
RHO = (math.sqrt(math.log(1e6) + 1) - math.sqrt(math.log(1e6))) ** 2
# The windows close by count, so the noise covers replacing one record (protocol section 14).
# h: L2 = sqrt(2) (one record moved to another bucket), the whole rho on the buckets:
# sigma = sqrt(2) / sqrt(2 rho) = 7.566.
HIST_SIGMA = math.sqrt(2) / math.sqrt(2 * RHO)
# m: L1 = (100 - 0) * 2^16, half of eps on the sum and half on the count (count_share 0.5).
MEAN_SUM_B, MEAN_COUNT_B = 100 * F / 0.5, 1 / 0.5
# v: L2 = 2 (C * 2^f + sqrt(d) / 2) = 2 (65536 + 1) (a vector replaced by its opposite, with the
# rounding), rho / 2 each: sigma = L2 / sqrt(2 * rho / 2).
VEC_SUM_SIGMA, VEC_COUNT_SIGMA = 2 * (F + 1) / math.sqrt(RHO), 1 / math.sqrt(RHO)


def test_histogram_mean_and_vector_releases_over_the_broker(sidecar_factory):
    assert HIST_SIGMA == pytest.approx(7.566, abs=5e-3) and VEC_SUM_SIGMA / F == pytest.approx(15.13, abs=1e-2)
    started = time.monotonic()
    sc = sidecar_factory(STREAMS)
    with Consumer(sc.config, list(STREAMS)) as consumer:
        policies = consumer.enclave.policy.streams
        with Producer(sc.config) as producer:
            for stream, values in (("h", HIST_VALUES), ("m", MEAN_VALUES), ("v", VEC_VALUES)):
                for v in values:
                    producer.send(stream, v if isinstance(v, list) else [v])
        got: dict[str, Release] = {}
        for message in consumer.releases(idle_timeout=30):
            assert isinstance(message, Release) and message.stream not in got
            got[message.stream] = message
            if len(got) == len(STREAMS):
                break
        assert consumer.verifier.rejected == 0
        for stream, r in got.items():  # the Consumer followed each stream's ledger from genesis
            assert consumer.chains[stream].releases == 1 and consumer.chains[stream].gaps == []
            assert verify_chain([r]).head.hex() == r.budget["ledger_head"]
    assert set(got) == set(STREAMS), got.keys()

    h = got["h"]
    assert h.aggregate == "histogram" and h.window == 1 and h.mechanism == "gaussian"
    assert h.sum_noise_scale == pytest.approx(HIST_SIGMA, rel=1e-12) and h.count_noise_scale is None
    assert h.rho == pytest.approx(RHO, rel=1e-12)
    for released, true in zip(h.sum_fixed, [10, 20, 35]):
        assert abs(released - true) < 8 * HIST_SIGMA, (h.sum_fixed, HIST_SIGMA)
    assert h.sum == [float(c) for c in h.sum_fixed] and h.count == sum(h.sum_fixed) and h.mean is None

    m = got["m"]
    assert m.aggregate == "mean" and m.mechanism == "laplace" and m.rho is None
    assert m.sum_noise_scale == pytest.approx(MEAN_SUM_B, rel=1e-12)
    assert m.count_noise_scale == pytest.approx(MEAN_COUNT_B, rel=1e-12)
    assert abs(m.sum_fixed[0] - sum(MEAN_VALUES) * F) < 30 * MEAN_SUM_B
    assert abs(m.count - len(MEAN_VALUES)) < 30 * MEAN_COUNT_B and m.count > 0
    assert m.sum == [m.sum_fixed[0] / F]
    assert m.mean == [m.sum[0] / m.count]  # post-processed from the noised values only

    v = got["v"]
    assert v.aggregate == "vector" and v.dimension == 4
    assert v.sum_noise_scale == pytest.approx(VEC_SUM_SIGMA, rel=1e-12)
    assert v.count_noise_scale == pytest.approx(VEC_COUNT_SIGMA, rel=1e-12)
    encoded = [policies["v"].encode(x)[0] for x in VEC_VALUES]
    assert encoded[0] == [39322, 0, -52429, 0] and encoded[-1] == [39322, 52429, 0, 0]  # clipped to norm 1
    truth = [sum(col) for col in zip(*encoded)]
    for released, true in zip(v.sum_fixed, truth):
        assert abs(released - true) < 8 * VEC_SUM_SIGMA, (v.sum_fixed, truth, VEC_SUM_SIGMA)
    assert abs(v.count - len(VEC_VALUES)) < 8 * VEC_COUNT_SIGMA
    # 20 records and sigma 7.6: the count is not always positive; the mean stream checks the mean.
    assert v.mean == ([s / v.count for s in v.sum] if v.count > 0 else None)
    assert time.monotonic() - started < 60
