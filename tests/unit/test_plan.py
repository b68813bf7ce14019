"""``sealedsum plan`` (issue 12): its figures are those of the releases the enclave core signs
for the same policy: the same scales, the same budget, and (checked statistically) the spread
it promises."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from sealedsum.commands import main
from sealedsum.commands.plan import describe
from sealedsum.common import planning, privacy
from sealedsum.common.errors import ConfigError, ExitCode
from sealedsum.producers.client import RecordSealer
from tests.conftest import make_policy, make_world, now_ms, stream_table
from tests.stats import sd_check_failure

STREAMS = {
    "laplace_sum": stream_table(epsilon=0.5, lower=-2.0, upper=5.0, count_share=0.3),
    "gaussian_mean": stream_table(kind="mean", dimension=3, lower=-10.0, upper=10.0, fraction_bits=12,
                                  mechanism="gaussian", epsilon=2.0, delta=1e-6, count_share=0.25),
    "histogram": stream_table(kind="histogram", dimension=None, edges=[0, 10, 20, 50], lower=None,
                              upper=None, epsilon=0.1, window_records=3, min_batch=1),
    "model": stream_table(kind="vector", dimension=3, lower=None, upper=None, l2_bound=2.0, fraction_bits=8,
                          mechanism="gaussian", epsilon=1.0, delta=1e-6, window_records=3, min_batch=1,
                          max_records_per_producer=2),
    "by_time": stream_table(window_records=None, window_seconds=1.0, min_batch=1, epsilon=0.25,
                            budget_epsilon=10.0),
}
VALUES = {"laplace_sum": [1.0], "gaussian_mean": [1.0, 2.0, 3.0], "histogram": [15.0],
          "model": [0.5, 0.5, 0.5], "by_time": [50.0]}


def one_release(world, name: str):
    """The first release of ``name``: records until a count-closed window closes, or a
    time-closed window ticked past its end."""
    sealer = RecordSealer(world.attested, producer_id=b"A" * 16)
    policy = world.enclave.policy.streams[name]
    if not policy.count_closed:
        start = (now_ms() // policy.window_ms + 1) * policy.window_ms  # the enclave's clock only goes on
        world.enclave.on_tick(start)
        for _ in range(100):  # so that the noised count reaches min_batch: the window is published
            out = world.enclave.on_record(sealer.seal(name, VALUES[name], now_ms=start + 10).body, start + 10)
            assert out.rejection is None
        (pub,) = world.enclave.on_tick(start + policy.window_ms).publish
        return pub.message
    for i in range(policy.window_records):
        sealer = RecordSealer(world.attested, producer_id=bytes([i + 1]) * 16)  # within any contribution bound
        out = world.enclave.on_record(sealer.seal(name, VALUES[name]).body, now_ms())
        assert out.rejection is None
    (pub,) = out.publish
    return pub.message


@pytest.fixture(scope="module")
def released(small_keys):
    policy = make_policy(STREAMS)
    world = make_world(small_keys, policy)
    return policy, {name: one_release(world, name) for name in STREAMS}


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_plan_scales_are_the_released_scales(released, name):
    policy, releases = released
    release = releases[name]
    plan = planning.stream_plan(policy, name)
    assert plan.sum_noise_scale_fixed == release.sum_noise_scale
    assert plan.count_noise_scale == release.count_noise_scale
    assert plan.rho == release.rho
    view = release.to_json()
    assert plan.sum_noise_scale == view["sum_noise_scale"]
    assert plan.mechanism == release.mechanism and plan.epsilon == release.epsilon
    # The budget the plan counts is the enclave's (a time-closed stream was charged an empty window too).
    assert plan.releases == release.budget["remaining_releases"] + release.budget["releases"]
    std = planning.sampler_std(release.mechanism, release.sum_noise_scale) * 2.0 ** -release.fraction_bits
    assert plan.sum_std == std
    assert plan.sum_std == pytest.approx(privacy.noise_std(release.mechanism, release.sum_noise_scale)
                                         * 2.0 ** -release.fraction_bits, rel=1e-3)


def test_plan_states_relation_budget_duration_and_relative_errors():
    policy = make_policy(STREAMS)
    by_time = planning.stream_plan(policy, "by_time", records_per_window=200)
    assert by_time.neighbouring == "add/remove" and by_time.releases == 40
    assert by_time.budget_lasts_seconds == 40.0 and by_time.budget_lasts_at_least_seconds is None
    # Midpoint 50 of [0, 100]: the sum is about 200·50, its noise scale 100/(0.25·0.5).
    assert by_time.typical_value == [50.0]
    assert by_time.sum_relative_error == [pytest.approx(planning.sampler_std("laplace", 800 * 2**16) / 2**16 / (200 * 50))]
    assert by_time.count_relative_error == pytest.approx(planning.sampler_std("laplace", 8) / 200)
    assert by_time.count_relative_error == pytest.approx(math.sqrt(2) * 8 / 200, rel=1e-2)
    assert planning.stream_plan(policy, "by_time").sum_relative_error is None  # no N: no guess

    model = planning.stream_plan(policy, "model")
    assert model.neighbouring == "replace-one" and model.privacy_unit_records == 2
    assert model.typical_value is None and model.mean_std is None  # an L2 ball's midpoint is 0
    typical = planning.stream_plan(policy, "model", typical_value=[0.5])
    assert typical.typical_value == [0.5] * 3 and typical.mean_relative_error is not None

    assert "need a typical value" in describe(model)
    centred = planning.stream_plan(policy, "gaussian_mean")  # [-10, 10]: the midpoint 0 has no relative error
    assert centred.sum_relative_error == [None] * 3 and any("assumed value is 0" in n for n in centred.notes)

    hist = planning.stream_plan(policy, "histogram", records_per_window=30)
    assert hist.count_noise_scale is None and hist.count_std == pytest.approx(math.sqrt(3) * hist.sum_std)
    assert hist.sum_relative_error == [pytest.approx(hist.sum_std / 10)] * 3


def test_release_interval_gives_the_least_time_the_budget_lasts():
    policy = make_policy({"s": stream_table(epsilon=1.0, budget_epsilon=5.0, min_release_interval_seconds=60)})
    p = planning.stream_plan(policy, "s")
    assert p.releases == 5 and p.budget_lasts_at_least_seconds == 240.0
    assert not p.one_producer_can_spend_budget
    assert planning.stream_plan(make_policy(), "s").one_producer_can_spend_budget


def test_typical_value_outside_the_bounds_is_refused():
    with pytest.raises(ConfigError, match="outside"):
        planning.stream_plan(make_policy(STREAMS), "laplace_sum", typical_value=[7.0])
    with pytest.raises(ConfigError):
        planning.stream_plan(make_policy(STREAMS), "gaussian_mean", typical_value=[1.0, 2.0])


def test_budget_group_counts_the_stream_alone_spending_the_group():
    from sealedsum.common.policy_parse import enclave_policy

    streams = {"a": stream_table(budget_epsilon=None, epsilon=1.0, budget_group="g"),
               "b": stream_table(budget_epsilon=None, epsilon=0.5, budget_group="g")}
    policy = enclave_policy({"paillier_bits": 1024, "insecure_test_keys": True}, streams, None,
                            {"g": {"budget_epsilon": 4.0}})
    a, b = planning.stream_plan(policy, "a"), planning.stream_plan(policy, "b")
    assert (a.budget_group, a.releases, b.releases) == ("g", 4, 8)
    assert any("budget group" in n for n in a.notes)


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "sealedsum.toml"
    path.write_text("""
[enclave]
paillier_bits = 1024
insecure_test_keys = true

[streams.purchases]
lower = 0.0
upper = 100.0
window_records = 20
min_batch = 5
mechanism = "laplace"
epsilon = 1.0
budget_epsilon = 50.0
min_release_interval_seconds = 10

[streams.hourly]
kind = "mean"
lower = 0.0
upper = 10.0
window_seconds = 3600
min_batch = 5
mechanism = "gaussian"
epsilon = 1.0
delta = 1e-6
budget_epsilon = 10.0
budget_delta = 1e-5
""")
    return path


def test_cli_prints_text_and_json(config_file, capsys):
    assert main(["plan", "--config", str(config_file)]) == ExitCode.OK
    out = capsys.readouterr().out
    assert "purchases (sum, d=1, laplace)" in out and "replace-one" in out and "noise scale 200" in out
    assert "50 release(s)" in out and "at least 490 s" in out
    assert "hourly (mean" in out and "add/remove" in out and "--records-per-window" in out

    assert main(["plan", "--config", str(config_file), "--stream", "hourly", "--records-per-window", "100",
                 "--json"]) == ExitCode.OK
    (line,) = capsys.readouterr().out.splitlines()
    view = json.loads(line)
    assert view["stream"] == "hourly" and view["neighbouring"] == "add/remove"
    assert view["records_per_window"] == 100 and view["typical_value"] == [5.0]
    assert view["budget_lasts_seconds"] == view["releases"] * 3600
    assert view["mean_std"][0] > 0


def test_cli_errors_are_usage_errors(config_file, capsys):
    assert main(["plan", "--config", str(config_file), "--stream", "nope"]) == ExitCode.USAGE
    assert "unknown stream" in capsys.readouterr().err
    assert main(["plan", "--config", str(config_file), "--typical-value", "x"]) == ExitCode.USAGE
    capsys.readouterr()
    assert main(["plan", "--config", str(config_file), "--typical-value", "3"]) == ExitCode.USAGE
    assert "--stream" in capsys.readouterr().err
    assert main(["plan", "--config", str(config_file), "--stream", "hourly", "--typical-value", "3"]) == ExitCode.OK


N = 1200
SD_RANGE = (0.8, 1.25)


@pytest.mark.slow
@pytest.mark.parametrize("mechanism, kind", [("laplace", "sum"), ("gaussian", "sum"), ("laplace", "histogram"),
                                             ("gaussian", "histogram")])
def test_released_spread_matches_the_planned_std(small_keys, mechanism, kind):
    """Residuals of many one-record releases have the standard deviation the plan prints, for
    the sum (in value units) or every histogram bucket, and for the count."""
    table = stream_table(mechanism=mechanism, epsilon=0.5, window_records=1, min_batch=1, lower=0.0, upper=10.0,
                         count_share=0.4, delta=1e-6 if mechanism == "gaussian" else None)
    truth = [3.0]
    if kind == "histogram":
        table = stream_table(**{**table, "kind": "histogram", "dimension": None, "edges": [0, 1, 5, 10], "lower": None,
                                "upper": None, "count_share": None})
        truth = [0.0, 1.0, 0.0]
    policy = make_policy({"s": table})
    world = make_world(small_keys, policy)
    plan = planning.stream_plan(policy, "s")
    # A correct sampler fails one of the checks below with at most this probability (tests/stats.py).
    assert sd_check_failure(mechanism, N, *SD_RANGE) < 1e-6
    sums, counts = [], []
    for _ in range(N):
        (pub,) = world.enclave.on_record(world.sealer.seal("s", [3.0]).body, now_ms()).publish
        sums.append([v - t for v, t in zip(pub.message.sum, truth)])
        counts.append(pub.message.count - 1)
    for i in range(len(truth)):
        assert SD_RANGE[0] < statistics.pstdev([r[i] for r in sums]) / plan.sum_std < SD_RANGE[1]
    assert SD_RANGE[0] < statistics.pstdev(counts) / plan.count_std < SD_RANGE[1]


@pytest.mark.parametrize("scale, terms, k", [(1.0, 2, 0), (1.0, 3, 5), (2.0, 3, -2), (0.5, 4, 1), (3.0, 1, 2),
                                             (3.0, 1, -4), (5.0, 5, 10)])
def test_publish_probability_is_the_documented_one(scale, terms, k):
    """Against docs/protocol.md section 12's formula and tests/unit/test_windows.py's convolution
    (which that module checks against real releases)."""
    from tests.unit.test_windows import discrete_laplace_at_least, sum_of_laplace_at_least

    expected = discrete_laplace_at_least(scale, k) if terms == 1 else sum_of_laplace_at_least(scale, terms, k)
    assert planning.laplace_sum_at_least(scale, terms, k) == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_time_closed_plan_gives_the_chance_a_window_is_published():
    from tests.unit.test_windows import discrete_laplace_at_least, sum_of_laplace_at_least

    policy = make_policy({
        "s": stream_table(window_records=None, window_seconds=60, min_batch=5, epsilon=1.0),
        "h": stream_table(kind="histogram", dimension=None, edges=[0, 1, 10, 100], lower=None, upper=None,
                          window_records=None, window_seconds=60, min_batch=5, epsilon=1.0),
        "g": stream_table(window_records=None, window_seconds=60, min_batch=5, mechanism="gaussian",
                          epsilon=1.0, delta=1e-6),
    })
    s = planning.stream_plan(policy, "s", records_per_window=3)
    assert s.publish_probability == pytest.approx(discrete_laplace_at_least(2.0, 2))
    h = planning.stream_plan(policy, "h", records_per_window=3)
    assert h.publish_probability == pytest.approx(sum_of_laplace_at_least(1.0, 3, 2))
    g = planning.stream_plan(policy, "g", records_per_window=5)
    assert g.publish_probability == pytest.approx(0.5 + 0.5 * math.erf(0.5 / (g.count_std * math.sqrt(2))))
    assert any("normal approximation" in n for n in g.notes)
    assert planning.stream_plan(make_policy(), "s").publish_probability is None  # count-closed


@pytest.mark.parametrize("mechanism", ["laplace", "gaussian"])
@pytest.mark.parametrize("scale", [0.2, 0.7, 2.0, 9.0, 30.0])
def test_sampler_std_is_that_of_the_discrete_noise(mechanism, scale):
    """Summed over the discrete distribution's mass directly; the continuous std would say
    sqrt(2)·0.2 for a Laplace scale of 0.2, whose discrete noise has std 0.117."""
    span = int(60 * scale) + 10
    if mechanism == "laplace":
        weights = {z: math.exp(-abs(z) / scale) for z in range(-span, span + 1)}
    else:
        weights = {z: math.exp(-z * z / (2 * scale * scale)) for z in range(-span, span + 1)}
    total = math.fsum(weights.values())
    expected = math.sqrt(math.fsum(z * z * w for z, w in weights.items()) / total)
    assert planning.sampler_std(mechanism, scale) == pytest.approx(expected, rel=1e-9)
