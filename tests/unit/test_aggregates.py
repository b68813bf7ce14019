"""Histograms, vectors (per-coordinate and L2 bounds), means and per-producer
contribution bounds: sensitivities against hand-computed cases, and real releases."""

from __future__ import annotations

import math

import pytest

from sealedsum.common.errors import ConfigError, PolicyMismatch, RejectReason
from sealedsum.producers.client import RecordSealer
from tests.conftest import make_policy, make_world, now_ms, stream_table

HUGE_EPS = 1e7  # noise negligible next to the totals, to check folding and encoding exactly


def policy_of(**table):
    return make_policy({"s": stream_table(**table)}).streams["s"]


# Time-closed windows (window_seconds alone) protect add/remove of one unit's records;
# count-closed ones (window_records, the default of stream_table) make the count public and
# protect a replacement of them, so their sensitivities are those of a replacement.
BY_TIME = dict(window_records=None, window_seconds=60.0)


# -- sensitivity, by hand ------------------------------------------------------------------
def test_sum_sensitivity_by_hand():
    # bounds [-3, 5], f = 0, d = 3. Add/remove: max(|l|, |u|) = 5 per coordinate.
    p = policy_of(dimension=3, lower=-3.0, upper=5.0, fraction_bits=0, **BY_TIME)
    assert p.neighbouring == "add/remove" and p.sensitivities() == (15, pytest.approx(math.sqrt(75)))
    plan = p.noise_plan()
    assert plan.sum_scale == pytest.approx(15 / (1.0 * 0.5)) and plan.count_scale == pytest.approx(2.0)
    # Replace-one: a value can move from -3 to 5, u - l = 8 per coordinate: L1 24, L2 sqrt(3·64).
    p = policy_of(dimension=3, lower=-3.0, upper=5.0, fraction_bits=0)
    assert p.neighbouring == "replace-one" and p.sensitivities() == (24, pytest.approx(math.sqrt(192)))
    assert p.noise_plan().sum_scale == pytest.approx(24 / (1.0 * 0.5))
    # Bounds on one side of 0 give the same either way: [0, 100] moves by at most 100.
    assert policy_of(lower=0.0, upper=100.0, fraction_bits=0).sensitivities()[0] == 100
    assert policy_of(lower=0.0, upper=100.0, fraction_bits=0, **BY_TIME).sensitivities()[0] == 100


def test_per_coordinate_vector_sensitivity_by_hand():
    # f = 2: bounds become [-4, 4], [0, 16], [-8, 4]. Add/remove: 4, 16, 8.
    table = dict(kind="vector", dimension=3, lower=[-1.0, 0.0, -2.0], upper=[1.0, 4.0, 1.0], fraction_bits=2)
    p = policy_of(**table, **BY_TIME)
    assert p.sensitivities() == (28, pytest.approx(math.sqrt(16 + 256 + 64)))
    assert p.coordinate_ranges(10) == [(-40, 40), (0, 160), (-80, 40)]
    # Replace-one: spans 8, 16, 12.
    assert policy_of(**table).sensitivities() == (36, pytest.approx(math.sqrt(64 + 256 + 144)))


def test_l2_vector_sensitivity_by_hand():
    # C = 1.5, f = 4, d = 4: C·2^f = 24; rounding adds sqrt(d)/2 = 1 to L2 and d/2 = 2 to L1.
    table = dict(kind="vector", dimension=4, l2_bound=1.5, fraction_bits=4, lower=None, upper=None,
                 mechanism="gaussian", delta=1e-6)
    p = policy_of(**table, **BY_TIME)
    assert p.sensitivities() == (50, 25.0)
    rho = (math.sqrt(math.log(1e6) + 1.0) - math.sqrt(math.log(1e6))) ** 2
    assert p.noise_plan().sum_scale == pytest.approx(25.0 / math.sqrt(2 * rho * 0.5))
    # Replace-one: a vector replaced by its opposite moves by twice its norm: 2C (with slack).
    p = policy_of(**table)
    assert p.sensitivities() == (100, 50.0)
    assert p.noise_plan().sum_scale == pytest.approx(50.0 / math.sqrt(2 * rho * 0.5))


def test_histogram_sensitivity_and_count_by_hand():
    table = dict(kind="histogram", dimension=None, edges=[0, 10, 20, 50, 100], lower=None, upper=None)
    p = policy_of(**table, **BY_TIME)
    assert p.dimension == 4 and p.values_per_record == 1 and p.fraction_bits == 0
    assert p.sensitivities() == (1, 1.0)
    plan = p.noise_plan()
    assert plan.count_scale is None and plan.sum_scale == pytest.approx(1 / 1.0)  # whole ε on the buckets
    # Replace-one: the record leaves one bucket for another: L1 2, L2 sqrt(2).
    p = policy_of(**table)
    assert p.sensitivities() == (2, pytest.approx(math.sqrt(2)))
    assert p.noise_plan().sum_scale == pytest.approx(2 / 1.0)


# One producer adds up to k one-hot records, each to any bucket. Under add/remove of those k
# records the bucket counts move by a vector of non-negative integers summing to k: L1 = k, and
# L2 = k in the worst case, all k in one bucket (sqrt(k) would be k records in k different
# buckets, the best case). The whole release budget goes to the buckets.
# Gaussian: rho = (sqrt(ln(1e6) + 1) - sqrt(ln(1e6)))^2 = 0.0174689..., sigma = k / sqrt(2 rho).
# (Time-closed windows: add/remove. Replace-one doubles L1 and multiplies L2 by sqrt(2): all k
# records leave one bucket for another.)
@pytest.mark.parametrize("mechanism, epsilon, k, scale", [
    ("laplace", 0.5, 1, 2.0),                  # b = 1 / 0.5
    ("laplace", 0.5, 3, 6.0),                  # b = 3 / 0.5
    ("gaussian", 1.0, 1, 5.3499800619762965),  # 1 / sqrt(2 * 0.0174689...)
    ("gaussian", 1.0, 3, 16.04994018592889),   # 3 / sqrt(2 * 0.0174689...), not sqrt(3) / ...
])
def test_histogram_sensitivity_with_a_contribution_bound_by_hand(mechanism, epsilon, k, scale):
    p = policy_of(kind="histogram", dimension=None, edges=[0, 10, 20, 50, 100], lower=None, upper=None,
                  mechanism=mechanism, epsilon=epsilon, delta=1e-6 if mechanism == "gaussian" else None,
                  max_records_per_producer=k if k > 1 else None, **BY_TIME)
    assert p.sensitivities() == (k, float(k))
    plan = p.noise_plan()
    assert plan.sum_scale == pytest.approx(scale, rel=1e-12)
    assert plan.count_scale is None and plan.sum_share == 1.0  # the count is the buckets' sum


def test_histogram_release_is_noised_for_k_records_per_producer(small_keys):
    world = make_world(small_keys, make_policy({"s": stream_table(
        kind="histogram", dimension=None, edges=[0, 10, 20], lower=None, upper=None, epsilon=0.5,
        window_records=3, min_batch=1, max_records_per_producer=3)}))
    alice = RecordSealer(world.attested, producer_id=b"A" * 16)
    outs = [world.enclave.on_record(alice.seal("s", [5.0]).body, now_ms()) for _ in range(3)]
    (pub,) = outs[-1].publish
    # Count-closed: replace-one, L1 = 2k = 6, b = 6 / 0.5.
    assert pub.message.sum_noise_scale == 12.0 and pub.message.count_noise_scale is None


def test_contribution_bound_multiplies_sensitivity():
    one = policy_of(dimension=2, lower=0.0, upper=10.0)
    three = policy_of(dimension=2, lower=0.0, upper=10.0, max_records_per_producer=3)
    assert three.sensitivities() == (3 * one.sensitivities()[0], pytest.approx(3 * one.sensitivities()[1]))
    assert three.noise_plan().count_scale == pytest.approx(3 * one.noise_plan().count_scale)


@pytest.mark.parametrize("table, message", [
    (dict(kind="histogram", dimension=None, edges=[0, 1], lower=0.0, upper=1.0), "does not apply to a histogram"),
    (dict(kind="histogram", dimension=None, edges=[0, 5, 5], lower=None, upper=None), "increase strictly"),
    (dict(kind="histogram", dimension=None, edges=[0], lower=None, upper=None), "at least two"),
    (dict(kind="sum", dimension=2, lower=[0.0, 1.0], upper=2.0), "per-coordinate bounds need kind"),
    (dict(kind="vector", dimension=2, lower=[0.0], upper=[1.0]), "has 1 entries"),
    (dict(kind="sum", l2_bound=1.0, lower=None, upper=None), "l2_bound applies to kind"),
    (dict(kind="vector", l2_bound=1.0), "either lower/upper or l2_bound"),
    (dict(kind="average"), "kind must be one of"),
])
def test_aggregate_config_errors(table, message):
    with pytest.raises(ConfigError, match=message):
        policy_of(**table)


# -- real releases ---------------------------------------------------------------------------
def test_histogram_release_counts_buckets(small_keys):
    world = make_world(small_keys, make_policy({"s": stream_table(
        kind="histogram", dimension=None, edges=[0, 10, 20, 50], lower=None, upper=None, epsilon=HUGE_EPS,
        window_records=6, min_batch=1)}))
    values = [3, 12, 15, 49.9, 50, 500]  # the last two land in the last bucket (right edge, clipped)
    outs = [world.enclave.on_record(world.sealer.seal("s", [v]).body, now_ms()) for v in values]
    (pub,) = outs[-1].publish
    r = pub.message
    assert r.aggregate == "histogram" and r.sum == [1.0, 2.0, 3.0] and r.count == 6 and r.mean is None
    assert r.to_json()["buckets"] == [1.0, 2.0, 3.0]
    assert small_keys.decryptions >= 3


def test_vector_with_l2_bound_clips_and_sums(small_keys):
    world = make_world(small_keys, make_policy({"s": stream_table(
        kind="vector", dimension=3, l2_bound=1.0, lower=None, upper=None, epsilon=HUGE_EPS,
        window_records=2, min_batch=1)}))
    a, b = [0.6, 0.0, -0.8], [3.0, 4.0, 0.0]  # |a| = 1 stays; b is scaled to [0.6, 0.8, 0]
    sealed = world.sealer.seal("s", b)
    assert sealed.clipped == 1
    world.enclave.on_record(world.sealer.seal("s", a).body, now_ms())
    (pub,) = world.enclave.on_record(sealed.body, now_ms()).publish
    assert pub.message.sum == pytest.approx([1.2, 0.8, -0.8], abs=1e-4)
    assert pub.message.mean == pytest.approx([0.6, 0.4, -0.4], abs=1e-4)


def test_per_coordinate_bounds_clip_each_coordinate(small_keys):
    world = make_world(small_keys, make_policy({"s": stream_table(
        kind="vector", dimension=2, lower=[0.0, -1.0], upper=[10.0, 1.0], epsilon=HUGE_EPS,
        window_records=1, min_batch=1)}))
    sealed = world.sealer.seal("s", [20.0, -0.5])
    assert sealed.clipped == 1
    (pub,) = world.enclave.on_record(sealed.body, now_ms()).publish
    assert pub.message.sum == pytest.approx([10.0, -0.5], abs=1e-4)


def test_mean_is_post_processed_from_noised_sum_and_count(small_keys):
    # 40 records and 90% of eps = 1 on the count: its discrete Laplace noise has scale 1/0.9, and
    # P(noise <= -40) = exp(-36) / (1 + exp(-0.9)) < 3e-16, so the count is positive and the
    # mean is released; it is never skipped.
    world = make_world(small_keys, make_policy({"s": stream_table(
        kind="mean", window_records=40, min_batch=1, count_share=0.9)}))
    outs = [world.enclave.on_record(world.sealer.seal("s", [v]).body, now_ms()) for v in range(10, 50)]
    r = outs[-1].publish[0].message
    assert r.aggregate == "mean" and r.count_noise_scale == pytest.approx(1 / 0.9)
    assert r.count > 0
    assert r.mean == [r.sum[0] / r.count]  # exactly the noised quantities, nothing else


def test_contribution_limit_per_producer_per_window(small_keys):
    world = make_world(small_keys, make_policy({"s": stream_table(
        window_records=10, min_batch=1, max_records_per_producer=2)}))
    alice = RecordSealer(world.attested, producer_id=b"A" * 16)
    bob = RecordSealer(world.attested, producer_id=b"B" * 16)
    e = world.enclave
    assert e.on_record(alice.seal("s", [1.0]).body, now_ms()).rejection is None
    assert e.on_record(alice.seal("s", [1.0]).body, now_ms()).rejection is None
    third = e.on_record(alice.seal("s", [1.0]).body, now_ms())
    assert third.rejection.reason is RejectReason.CONTRIBUTION_LIMIT
    assert e.on_record(bob.seal("s", [1.0]).body, now_ms()).rejection is None
    assert e.streams["s"].current.count == 3 and e.stats.accepted == 3


def test_wrong_number_of_values_is_refused_before_encryption(world):
    with pytest.raises(PolicyMismatch, match="takes 1 value"):
        world.sealer.seal("s", [1.0, 2.0])


def test_anonymous_records_are_refused_where_contributions_are_bounded(small_keys):
    world = make_world(small_keys, make_policy({"s": stream_table(window_records=10, min_batch=1,
                                                                  max_records_per_producer=1)}))
    anonymous = RecordSealer(world.attested, producer_id=bytes(16))
    out = world.enclave.on_record(anonymous.seal("s", [1.0]).body, now_ms())
    assert out.rejection.reason is RejectReason.CONTRIBUTION_LIMIT and "anonymous" in out.rejection.detail


def test_overflow_check_covers_negative_bounds():
    with pytest.raises(ConfigError, match="overflow 62 bits"):
        policy_of(lower=-1e12, upper=0.0, window_records=1000, min_batch=1)
