"""Privacy arithmetic against hand-computed values, and against OpenDP's own privacy maps."""

from __future__ import annotations

import dataclasses
import math

import pytest

from sealedsum.common import fixedpoint, privacy
from sealedsum.common.errors import CalibrationError, PolicyMismatch
from sealedsum.sidecar.enclave import noise
from tests.conftest import make_policy, stream_table

LN_1E6 = 13.815510557964274  # ln(10^6) = 6 ln 10
RHO_EPS1_DELTA1E6 = (math.sqrt(LN_1E6 + 1) - math.sqrt(LN_1E6)) ** 2  # = 0.0174689...


# -- fixed point and sensitivity ----------------------------------------------------------
@pytest.mark.parametrize("lower,upper,f,expected", [
    (-3, 5, 0, 5),
    (-3, 5, 4, 80),          # 5 * 16
    (-7, 5, 4, 112),         # |-7| * 16 wins
    (0, 100, 16, 6_553_600),
    (-3.04, 2.5, 1, 6),      # round(-6.08) = -6, round(5.0) = 5
    (0, 2.5, 0, 2),          # round half to even: 2.5 -> 2, as the encoder does
    (-3.5, 0, 0, 4),         # -3.5 -> -4
    (0, 0.4, 0, 0),
    (-0.5, 0.25, 2, 2),      # -2 and 1
])
def test_fixed_bound(lower, upper, f, expected):
    assert privacy.fixed_bound(lower, upper, f) == expected


def test_fixed_bound_covers_every_encoded_clipped_value():
    lower, upper, f = -3.04, 2.5, 1
    bound = privacy.fixed_bound(lower, upper, f)
    xs = [lower + i * (upper - lower) / 997 for i in range(998)] + [-100.0, 100.0]
    clipped, _ = fixedpoint.clip(xs, lower, upper)
    enc = fixedpoint.encode(clipped, f)
    assert max(abs(v) for v in enc) == bound


def test_sensitivities():
    assert privacy.sensitivity_l1([5, 5, 5]) == 15
    assert privacy.sensitivity_l2([5, 5, 5]) == pytest.approx(math.sqrt(3) * 5, rel=1e-15)
    assert privacy.sensitivity_l2([80] * 3) == pytest.approx(math.sqrt(3) * 80, rel=1e-15)
    assert privacy.sensitivity_l2([3, 4]) == 5.0
    assert privacy.sensitivity_l1([3, 4]) == 7


# -- Laplace -------------------------------------------------------------------------------
@pytest.mark.parametrize("f,bound", [(0, 5), (4, 80)])
@pytest.mark.parametrize("share", [0.5, 0.25])
def test_laplace_plan_by_hand(f, bound, share):
    """Bounds [-3, 5], dimension 3: Δ1 = 3·5·2^f; b_sum = Δ1/(ε(1-share)), b_count = 1/(ε·share)."""
    eps = 0.8
    p = make_policy({"s": stream_table(lower=-3, upper=5, fraction_bits=f, dimension=3, epsilon=eps,
                                       count_share=share, window_records=None, window_seconds=60.0)}
                    ).streams["s"].noise_plan()  # time-closed: add/remove
    assert p.mechanism == "laplace" and p.rho is None and p.delta == 0.0
    assert p.sensitivity_l1 == 3 * bound
    assert p.sum_scale == pytest.approx(3 * bound / (eps * (1 - share)), rel=1e-12)
    assert p.count_scale == pytest.approx(1 / (eps * share), rel=1e-12)
    assert p.sum_budget + p.count_budget == pytest.approx(eps, rel=1e-12)
    assert p.sum_budget == pytest.approx(eps * (1 - share))


def test_laplace_literal_values():
    p = privacy.plan("laplace", 15, 3 ** 0.5 * 5, 1.0, 0.0, 0.5)
    assert (p.sum_scale, p.count_scale) == (30.0, 2.0)
    p = privacy.plan("laplace", 240, 3 ** 0.5 * 80, 1.0, 0.0, 0.25)
    assert (p.sum_scale, p.count_scale) == (320.0, 4.0)


def test_smaller_epsilon_means_more_noise():
    strong = privacy.plan("laplace", 5, 5.0, 0.1, 0.0, 0.5)
    weak = privacy.plan("laplace", 5, 5.0, 10.0, 0.0, 0.5)
    assert strong.sum_scale > weak.sum_scale and strong.count_scale > weak.count_scale


# -- Gaussian ------------------------------------------------------------------------------
def test_rho_from_epsilon_delta_by_hand():
    assert math.log(1e6) == pytest.approx(LN_1E6, rel=1e-15)
    assert RHO_EPS1_DELTA1E6 == pytest.approx(0.0174689, rel=1e-5)
    assert privacy.rho_from_epsilon_delta(1.0, 1e-6) == pytest.approx(RHO_EPS1_DELTA1E6, rel=1e-12)


@pytest.mark.parametrize("eps,delta", [(1.0, 1e-6), (0.1, 1e-9), (5.0, 1e-5), (2.0, 0.5)])
def test_epsilon_round_trips_through_rho(eps, delta):
    rho = privacy.rho_from_epsilon_delta(eps, delta)
    assert privacy.epsilon_from_rho_delta(rho, delta) == pytest.approx(eps, rel=1e-12)
    # ε = ρ + 2 sqrt(ρ ln(1/δ)), written out.
    assert rho + 2 * math.sqrt(rho * math.log(1 / delta)) == pytest.approx(eps, rel=1e-12)


def test_gaussian_plan_by_hand():
    """Bounds [-3, 5], f=0, dimension 3: Δ2 = sqrt(3)·5; σ = Δ2/sqrt(2ρ(1-share)); ρ_sum = Δ2²/(2σ²)."""
    p = make_policy({"s": stream_table(lower=-3, upper=5, fraction_bits=0, dimension=3, mechanism="gaussian",
                                       epsilon=1.0, delta=1e-6, window_records=None, window_seconds=60.0)}
                    ).streams["s"].noise_plan()  # time-closed: add/remove
    l2 = math.sqrt(3) * 5
    assert p.sensitivity_l2 == pytest.approx(l2, rel=1e-15)
    assert p.rho == pytest.approx(RHO_EPS1_DELTA1E6, rel=1e-12)
    assert p.sum_scale == pytest.approx(l2 / math.sqrt(2 * RHO_EPS1_DELTA1E6 * 0.5), rel=1e-12)
    assert p.sum_scale == pytest.approx(65.5236, rel=1e-5)
    assert p.count_scale == pytest.approx(1 / math.sqrt(2 * RHO_EPS1_DELTA1E6 * 0.5), rel=1e-12)
    # zCDP: what each noise spends, and that the two add up to ρ.
    assert l2**2 / (2 * p.sum_scale**2) == pytest.approx(p.sum_budget, rel=1e-12)
    assert 1 / (2 * p.count_scale**2) == pytest.approx(p.count_budget, rel=1e-12)
    assert p.sum_budget + p.count_budget == pytest.approx(p.rho, rel=1e-12)


def test_noise_std():
    assert privacy.noise_std("laplace", 3.0) == pytest.approx(3.0 * math.sqrt(2))
    assert privacy.noise_std("gaussian", 3.0) == 3.0


@pytest.mark.parametrize("call", [
    lambda: privacy.rho_from_epsilon_delta(0, 1e-6),
    lambda: privacy.rho_from_epsilon_delta(1, 0),
    lambda: privacy.rho_from_epsilon_delta(1, 1),
    lambda: privacy.epsilon_from_rho_delta(-1e-3, 1e-6),
    lambda: privacy.epsilon_from_rho_delta(1, 1.5),
    lambda: privacy.plan("laplace", 1, 1.0, 1.0, 0.0, 0.0),
    lambda: privacy.plan("laplace", 1, 1.0, 1.0, 0.0, 1.0),
    lambda: privacy.plan("exponential", 1, 1.0, 1.0, 0.0, 0.5),
])
def test_out_of_range_arguments(call):
    with pytest.raises(ValueError):
        call()


# -- OpenDP agrees ---------------------------------------------------------------------------
PLANS = {
    "laplace-f0-d3": stream_table(lower=-3, upper=5, fraction_bits=0, dimension=3),
    "laplace-f4-d3": stream_table(lower=-3, upper=5, fraction_bits=4, dimension=3, count_share=0.25),
    "laplace-default": stream_table(),
    "laplace-small-eps": stream_table(epsilon=0.05, dimension=8, lower=-1, upper=1),
    "gaussian-f0-d3": stream_table(lower=-3, upper=5, fraction_bits=0, dimension=3, mechanism="gaussian",
                                   delta=1e-6),
    "gaussian-default": stream_table(mechanism="gaussian", delta=1e-6, epsilon=2.0),
    "gaussian-d16": stream_table(mechanism="gaussian", delta=1e-9, epsilon=0.5, dimension=16, lower=-1, upper=1,
                                 count_share=0.1),
}


@pytest.mark.parametrize("name", list(PLANS))
def test_opendp_map_equals_the_planned_budget(name):
    plan = make_policy({"s": PLANS[name]}).streams["s"].noise_plan()
    d_in = plan.sensitivity_l1 if plan.mechanism == "laplace" else plan.sensitivity_l2
    spent_sum = noise.sum_measurement(plan).map(d_in)
    spent_count = noise.count_measurement(plan).map(1)
    assert spent_sum == pytest.approx(plan.sum_budget, rel=1e-9)
    assert spent_count == pytest.approx(plan.count_budget, rel=1e-9)
    total = plan.epsilon if plan.mechanism == "laplace" else plan.rho
    assert spent_sum + spent_count == pytest.approx(total, rel=1e-9)


@pytest.mark.parametrize("mechanism,extra", [("laplace", {}), ("gaussian", {"delta": 1e-6})])
def test_miscalibrated_scale_is_caught(mechanism, extra):
    """The OpenDP check in noise.py can fail: half the scale spends more than the plan allows."""
    plan = make_policy({"s": stream_table(mechanism=mechanism, **extra)}).streams["s"].noise_plan()
    with pytest.raises(CalibrationError):
        noise.sum_measurement(dataclasses.replace(plan, sum_scale=plan.sum_scale / 2))
    with pytest.raises(CalibrationError):
        noise.count_measurement(dataclasses.replace(plan, count_scale=plan.count_scale * 0.999))


def test_noise_keeps_integers_and_dimension():
    plan = make_policy({"s": stream_table(dimension=3, epsilon=1e6)}).streams["s"].noise_plan()
    out = noise.noisy_sum(plan, [10, -20, 30])
    assert len(out) == 3 and all(isinstance(v, int) for v in out)
    assert out == pytest.approx([10, -20, 30], abs=2000)  # scale ≈ 39 units at ε = 10^6
    assert isinstance(noise.noisy_count(plan, 7), int)


# -- clipping ------------------------------------------------------------------------------
def test_clip_and_encode():
    vals, n = fixedpoint.clip([-5, 0.5, 7, 3], -1.0, 3.0)
    assert vals == [-1.0, 0.5, 3.0, 3.0] and n == 2
    assert fixedpoint.encode([0.5, -1.0, 2.5], 2) == [2, -4, 10]
    assert fixedpoint.decode(10, 2) == 2.5


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "1", True, None, 10**400, -10**400])
def test_clip_refuses_non_numbers(bad):
    with pytest.raises(PolicyMismatch):
        fixedpoint.clip([1.0, bad], 0.0, 2.0)
